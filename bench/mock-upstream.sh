# Sourced by bench/callgrind, bench/profile and bench/idle-heap: starts a native `sluice
# mock-upstream` on a free port and writes a gateway config that names it as model "up".
# Needs `$bin` (the sluice binary) and `$work` (a scratch directory). Sets `port` (a free port
# for the gateway), `mock_port` and `mock` (the mock's pid); writes `$work/sluice.toml`, with
# the lines given as arguments first, and `$SLUICE_BENCH_MODEL` (if set) as a line of the
# model's own (e.g. 'http_version = "2"': h2c to the mock).
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

start_mock_upstream() {
  port=$(free_port)
  mock_port=$(free_port)
  "$bin" mock-upstream --listen "127.0.0.1:$mock_port" >"$work/mock.log" 2>&1 &
  mock=$!
  { for line in "$@"; do printf '%s\n' "$line"; done
    printf '[[models]]\nname = "up"\nkind = "openai"\nbase_url = "http://127.0.0.1:%s/v1"\n' "$mock_port"
    if [ -n "${SLUICE_BENCH_MODEL:-}" ]; then printf '%s\n' "$SLUICE_BENCH_MODEL"; fi
  } >"$work/sluice.toml"
}
