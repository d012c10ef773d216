// sluice's web page: a chat that survives a reload, and the operator's view of streams.
//
// No dependencies and no build step. Text from a model (or from anyone) only ever reaches the
// page as DOM text nodes: the markdown renderer below builds elements itself and never assigns
// HTML, and the page's Content-Security-Policy forbids inline scripts besides.

const KEY = "sluice.key";
const CHAT = "sluice.chat";
const MODEL = "sluice.model";
const EXTRA = "sluice.extra";
// Kept while a reload happens: the answer waits this long for the page to come back.
const ON_DISCONNECT = { grace_ms: 30000 };
const REFRESH_MS = 1000;

const $ = (id) => document.getElementById(id);

// ---------------------------------------------------------------- the API

let apiKey = localStorage.getItem(KEY) || "";

/** A request to the gateway, with the key when there is one. */
async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (apiKey) headers.Authorization = `Bearer ${apiKey}`;
  if (options.body) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) {
    const body = await response.json().catch(() => ({}));
    needKey(body.error ? body.error.message : "an API key is required");
    throw new ApiFailure(401, body);
  }
  return response;
}

class ApiFailure extends Error {
  constructor(status, body) {
    const e = (body && body.error) || {};
    super(e.message || `HTTP ${status}`);
    this.status = status;
    this.code = e.code || null;
    this.type = e.type || null;
  }
}

async function json(path, options) {
  const response = await api(path, options);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new ApiFailure(response.status, body);
  return body;
}

/**
 * Reads a server-sent event stream, calling `onEvent({id, data})` for each event, until it
 * ends. Comments (keep-alives) are skipped.
 */
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let event = { id: null, data: [] };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let newline;
    while ((newline = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, newline).replace(/\r$/, "");
      buffer = buffer.slice(newline + 1);
      if (line === "") {
        if (event.data.length) onEvent({ id: event.id, data: event.data.join("\n") });
        event = { id: null, data: [] };
      } else if (line.startsWith("data:")) {
        event.data.push(line.slice(5).replace(/^ /, ""));
      } else if (line.startsWith("id:")) {
        event.id = Number(line.slice(3).trim());
      }
    }
  }
}

// ---------------------------------------------------------------- alerts and the key

function showAlert(message) {
  const alert = $("alert");
  alert.textContent = message;
  alert.hidden = !message;
}

function needKey(message) {
  $("key-form").hidden = false;
  showAlert(apiKey ? `The API key was refused: ${message}` : `This gateway needs an API key: ${message}`);
  $("key").focus();
}

$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  apiKey = $("key").value.trim();
  localStorage.setItem(KEY, apiKey);
  showAlert("");
  start();
});

// ---------------------------------------------------------------- markdown, safely

/** Renders `text` as a little markdown into `into`, with text nodes only. */
function renderMarkdown(text, into) {
  into.replaceChildren();
  const lines = text.split("\n");
  let paragraph = null;
  let list = null;
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    const fence = line.match(/^\s*```(.*)$/);
    if (fence) {
      const code = [];
      i++;
      while (i < lines.length && !/^\s*```\s*$/.test(lines[i])) code.push(lines[i++]);
      const pre = document.createElement("pre");
      const el = document.createElement("code");
      if (fence[1].trim()) el.dataset.lang = fence[1].trim();
      el.textContent = code.join("\n");
      pre.append(el);
      into.append(pre);
      paragraph = list = null;
      continue;
    }
    if (!line.trim()) {
      paragraph = list = null;
      continue;
    }
    const heading = line.match(/^(#{1,6})\s+(.*)$/);
    if (heading) {
      const h = document.createElement("p");
      const strong = document.createElement("strong");
      inline(heading[2], strong);
      h.append(strong);
      into.append(h);
      paragraph = list = null;
      continue;
    }
    const item = line.match(/^\s*([-*+]|\d+[.)])\s+(.*)$/);
    if (item) {
      const ordered = /\d/.test(item[1]);
      if (!list || (list.tagName === "OL") !== ordered) {
        list = document.createElement(ordered ? "ol" : "ul");
        into.append(list);
      }
      const li = document.createElement("li");
      inline(item[2], li);
      list.append(li);
      paragraph = null;
      continue;
    }
    list = null;
    if (!paragraph) {
      paragraph = document.createElement("p");
      into.append(paragraph);
    } else {
      paragraph.append(document.createElement("br"));
    }
    inline(line, paragraph);
  }
}

/** Inline code, bold, italic and http(s) links; everything else is text. */
function inline(text, into) {
  const pattern = /(`[^`]+`)|(\*\*[^*]+\*\*)|(\*[^*\s][^*]*\*)|(\[[^\]]+\]\([^)\s]+\))/g;
  let at = 0;
  for (const m of text.matchAll(pattern)) {
    if (m.index > at) into.append(text.slice(at, m.index));
    const token = m[0];
    let el;
    if (m[1]) {
      el = document.createElement("code");
      el.textContent = token.slice(1, -1);
    } else if (m[2]) {
      el = document.createElement("strong");
      el.textContent = token.slice(2, -2);
    } else if (m[3]) {
      el = document.createElement("em");
      el.textContent = token.slice(1, -1);
    } else {
      const [, label, href] = token.match(/^\[([^\]]+)\]\(([^)\s]+)\)$/);
      if (/^https?:\/\//i.test(href)) {
        el = document.createElement("a");
        el.href = href;
        el.rel = "noopener noreferrer nofollow";
        el.target = "_blank";
        el.textContent = label;
      } else {
        el = document.createTextNode(token);
      }
    }
    into.append(el);
    at = m.index + token.length;
  }
  if (at < text.length) into.append(text.slice(at));
}

// ---------------------------------------------------------------- how a stream ended

const STATES = {
  completed: "completed",
  cancelled: "cancelled",
  timed_out: "timed out",
  failed: "failed",
  interrupted: "interrupted",
  streaming: "streaming",
};
const REASONS = {
  requested: "stopped on request",
  client_disconnected: "the client left",
  slow_client: "the client read too slowly",
  first_token: "no first token in time",
  idle: "the upstream went quiet (idle timer)",
  total: "the total deadline passed",
  upstream_error: "the upstream answered with an error",
  upstream_protocol_error: "the upstream broke the protocol",
  store_error: "the store could not keep it",
  shutdown: "the gateway shut down",
  crash: "the gateway stopped",
};

function describe(status, reason) {
  const state = STATES[status] || status;
  return reason ? `${state}: ${REASONS[reason] || reason}` : state;
}

const ms = (v) => (v == null ? "—" : v >= 10000 ? `${(v / 1000).toFixed(1)} s` : `${Math.round(v)} ms`);

// ---------------------------------------------------------------- the chat

/** The conversation, as kept in local storage so a reload brings it back. */
let chat = loadChat();
/** The answer in flight: {msg, el, stopRequested}. */
let inFlight = null;

function loadChat() {
  try {
    const c = JSON.parse(localStorage.getItem(CHAT) || "null");
    if (c && Array.isArray(c.messages)) return c;
  } catch (_) {
    // A damaged conversation is dropped.
  }
  return { messages: [] };
}

function saveChat() {
  localStorage.setItem(CHAT, JSON.stringify(chat));
}

function messageElement(msg) {
  const li = document.createElement("li");
  li.className = `msg ${msg.role}`;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = msg.role === "user" ? "You" : `Assistant · ${msg.model || ""}`;
  const body = document.createElement("div");
  body.className = msg.role === "user" ? "text" : "answer";
  li.append(who, body);
  if (msg.role === "assistant") {
    const ending = document.createElement("div");
    ending.className = "ending";
    li.append(ending);
  }
  li.msg = msg;
  return li;
}

function paint(li) {
  const msg = li.msg;
  const body = li.querySelector(msg.role === "user" ? ".text" : ".answer");
  if (msg.role === "user") {
    body.textContent = msg.content;
    return;
  }
  renderMarkdown(msg.content, body);
  const ending = li.querySelector(".ending");
  ending.replaceChildren();
  const state = document.createElement("span");
  state.className = `state ${msg.status}`;
  state.textContent = msg.status === "streaming" && inFlight && inFlight.stopRequested ? "stopping…" : describe(msg.status, msg.reason);
  ending.append(state);
  if (msg.detail && msg.status !== "completed") {
    const detail = document.createElement("span");
    detail.className = "detail-text";
    detail.textContent = msg.detail;
    ending.append(detail);
  }
  const t = msg.timings;
  if (t) {
    const add = (label, value) => {
      const span = document.createElement("span");
      span.textContent = `${label} ${value}`;
      ending.append(span);
    };
    add("first token", ms(t.time_to_first_token_ms));
    if (t.tokens_per_second != null) add("tokens/s", t.tokens_per_second.toFixed(1));
    add("total", ms(t.total_ms));
  }
}

/** Repaints an answer at most once a frame, however fast its chunks come. */
function schedulePaint(li) {
  if (li.pending) return;
  li.pending = true;
  requestAnimationFrame(() => {
    li.pending = false;
    paint(li);
  });
}

function renderChat() {
  const list = $("messages");
  list.replaceChildren();
  for (const msg of chat.messages) {
    const li = messageElement(msg);
    paint(li);
    list.append(li);
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

function extraFields() {
  const text = $("extra").value.trim();
  localStorage.setItem(EXTRA, text);
  $("extra-error").hidden = true;
  if (!text) return {};
  try {
    const v = JSON.parse(text);
    if (v && typeof v === "object" && !Array.isArray(v)) return v;
  } catch (_) {
    // Said below.
  }
  $("extra-error").textContent = "Extra request fields must be a JSON object.";
  $("extra-error").hidden = false;
  $("extra").closest("details").open = true;
  return null;
}

async function send() {
  const prompt = $("prompt").value;
  if (!prompt.trim() || inFlight) return;
  const extra = extraFields();
  if (extra === null) return;
  const model = $("model").value;
  const history = chat.messages
    .filter((m) => m.role === "user" || (m.role === "assistant" && m.content))
    .map((m) => ({ role: m.role, content: m.content }));
  history.push({ role: "user", content: prompt });
  const user = { role: "user", content: prompt };
  const msg = { role: "assistant", model, content: "", status: "streaming", reason: null, streamId: null, seq: 0 };
  chat.messages.push(user, msg);
  saveChat();
  $("prompt").value = "";
  const list = $("messages");
  const userLi = messageElement(user);
  paint(userLi);
  const li = messageElement(msg);
  list.append(userLi, li);
  paint(li);
  const sluice = { ...(extra.sluice || {}), on_disconnect: (extra.sluice && extra.sluice.on_disconnect) || ON_DISCONNECT };
  const body = { ...extra, model, messages: history, stream: true, sluice };
  await relay(li, () => api("/v1/chat/completions", { method: "POST", body: JSON.stringify(body) }));
}

/** Resumes an answer that was streaming when the page went away, after its last event. */
async function resume(li) {
  const msg = li.msg;
  if (!msg.streamId) {
    // It never started streaming before the page went away: nothing to resume from.
    msg.status = "interrupted";
    msg.reason = null;
    msg.detail = "the page reloaded before the answer began";
    saveChat();
    paint(li);
    return;
  }
  await relay(li, () => api(`/v1/streams/${encodeURIComponent(msg.streamId)}/events?after=${msg.seq}`));
}

/** Streams an answer into `li` from the response `open()` gives, then shows how it ended. */
async function relay(li, open) {
  const msg = li.msg;
  inFlight = { msg, li, stopRequested: false };
  setBusy(true);
  try {
    const response = await open();
    msg.streamId = response.headers.get("x-sluice-stream-id") || msg.streamId;
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      const e = new ApiFailure(response.status, body);
      end(li, e.type && STATES[e.type] ? e.type : "failed", e.code, e.message);
      return;
    }
    saveChat();
    if (inFlight.stopRequested) cancelStream(msg.streamId);
    let ended = false;
    await readEvents(response, (event) => {
      if (event.data === "[DONE]") {
        ended = true;
        end(li, "completed", null, null);
        return;
      }
      let data;
      try {
        data = JSON.parse(event.data);
      } catch (_) {
        return;
      }
      if (data.error) {
        ended = true;
        end(li, data.error.type || "failed", data.error.code, data.error.message);
        return;
      }
      const choice = data.choices && data.choices[0];
      const text = choice && choice.delta && choice.delta.content;
      if (data.sluice_target !== undefined || data.sluice_gather) {
        gathered(msg, data, text);
      } else if (text) {
        msg.content += text;
      }
      if (event.id) msg.seq = event.id;
      // The text and the last event id are saved together: a reload resumes exactly here.
      saveChat();
      schedulePaint(li);
    });
    if (!ended) end(li, "failed", null, "the connection closed before the stream ended");
  } catch (e) {
    if (e instanceof ApiFailure) end(li, "failed", e.code, e.message);
    else end(li, "failed", null, `the connection failed: ${e.message}`);
  }
}

/**
 * A gather route's answer: each target's text under its name, and, once the last chunk lists
 * them, how each one ended.
 */
function gathered(msg, data, text) {
  msg.parts = msg.parts || {};
  msg.outcomes = msg.outcomes || {};
  if (data.sluice_target !== undefined && text) msg.parts[data.sluice_target] = (msg.parts[data.sluice_target] || "") + text;
  for (const t of data.sluice_gather || []) {
    msg.outcomes[t.target] = t.status;
    if (!(t.target in msg.parts)) msg.parts[t.target] = "";
  }
  msg.content = Object.entries(msg.parts)
    .map(([target, part]) => {
      const outcome = msg.outcomes[target];
      const heading = outcome ? `**${target}** (${describe(outcome, null)})` : `**${target}**`;
      return `${heading}\n\n${part}`;
    })
    .join("\n\n");
}

function end(li, status, reason, detail) {
  const msg = li.msg;
  msg.status = status;
  msg.reason = reason || null;
  msg.detail = detail || null;
  inFlight = null;
  setBusy(false);
  saveChat();
  paint(li);
  if (msg.streamId) showTimings(li);
}

/** The gateway's own timings of an answer, from its transcript. */
async function showTimings(li) {
  const msg = li.msg;
  try {
    const t = await json(`/v1/streams/${encodeURIComponent(msg.streamId)}`);
    const first = t.timings.time_to_first_token_ms;
    const total = t.timings.total_ms;
    const tokens = (t.usage && t.usage.completion_tokens) || t.chunks.length;
    const span = total != null && first != null ? (total - first) / 1000 : null;
    msg.timings = {
      time_to_first_token_ms: first,
      total_ms: total,
      tokens_per_second: span > 0 && tokens > 1 ? tokens / span : null,
    };
    // The transcript is the record: its status and reason are what the page shows.
    msg.status = t.status;
    msg.reason = t.reason;
    msg.detail = t.detail;
    saveChat();
    paint(li);
  } catch (_) {
    // Timings are a nicety: the ending is already shown.
  }
}

function stop() {
  if (!inFlight) return;
  inFlight.stopRequested = true;
  paint(inFlight.li);
  // Cancelled in the gateway, not only here: the upstream stops too. Before the first token
  // the stream's id is not known yet; the cancel goes out as soon as it is.
  if (inFlight.msg.streamId) cancelStream(inFlight.msg.streamId);
}

async function cancelStream(id) {
  try {
    await json(`/v1/streams/${encodeURIComponent(id)}/cancel`, { method: "POST" });
  } catch (e) {
    showAlert(`The stream could not be cancelled: ${e.message}`);
  }
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  send();
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    send();
  }
});
document.addEventListener("keydown", (e) => {
  if (e.key === "Escape" && inFlight) {
    e.preventDefault();
    stop();
  }
});
$("stop").addEventListener("click", stop);
$("new-chat").addEventListener("click", () => {
  if (inFlight) return;
  chat = { messages: [] };
  saveChat();
  renderChat();
  $("prompt").focus();
});
$("model").addEventListener("change", () => localStorage.setItem(MODEL, $("model").value));

// ---------------------------------------------------------------- the streams view

let cursor = null; // `after` of the page shown; null: the newest
let older = []; // cursors of the pages before, for "Newest"
let lastId = null;
let refreshTimer = null;
let openId = null;
let follow = null; // AbortController of the live follow of the open stream

async function loadStreams() {
  const query = cursor ? `?limit=20&after=${encodeURIComponent(cursor)}` : "?limit=20";
  let page;
  try {
    page = await json(`/v1/streams${query}`);
  } catch (e) {
    if (!(e instanceof ApiFailure && e.status === 401)) showAlert(`Streams could not be read: ${e.message}`);
    return;
  }
  lastId = page.last_id;
  $("older").disabled = !page.has_more;
  $("newest").disabled = cursor === null;
  const body = document.querySelector("#stream-table tbody");
  const rows = page.data.map((s) => {
    const tr = document.createElement("tr");
    tr.tabIndex = 0;
    tr.dataset.id = s.id;
    if (s.id === openId) tr.setAttribute("aria-current", "true");
    const duration = s.timings.total_ms != null ? s.timings.total_ms : s.status === "streaming" ? Date.now() - s.created * 1000 : null;
    const cells = [s.id.slice(0, 8), s.model, describe(s.status, s.reason), String(s.chunk_count), ms(s.timings.time_to_first_token_ms), ms(duration)];
    cells.forEach((text, i) => {
      const td = document.createElement("td");
      td.textContent = text;
      if (i === 0) {
        td.className = "id";
        td.title = s.id;
      }
      if (i === 2) td.className = `state ${s.status}`;
      tr.append(td);
    });
    tr.addEventListener("click", () => openStream(s.id));
    tr.addEventListener("keydown", (e) => {
      if (e.key === "Enter" || e.key === " ") {
        e.preventDefault();
        openStream(s.id);
      }
    });
    return tr;
  });
  body.replaceChildren(...rows);
}

$("older").addEventListener("click", () => {
  older.push(cursor);
  cursor = lastId;
  loadStreams();
});
$("newest").addEventListener("click", () => {
  cursor = null;
  older = [];
  loadStreams();
});

async function openStream(id) {
  closeStream();
  openId = id;
  $("detail").hidden = false;
  $("detail-title").textContent = `Stream ${id}`;
  // Nothing of the stream shown before stays under this one's title while its transcript loads.
  $("detail-status").textContent = "loading…";
  $("detail-status").className = "status state";
  $("detail-cancel").hidden = true;
  $("detail-request").replaceChildren();
  $("detail-answer").replaceChildren();
  $("timeline").replaceChildren();
  $("timeline-caption").textContent = "";
  document.querySelectorAll("#stream-table tbody tr").forEach((tr) => {
    if (tr.dataset.id === id) tr.setAttribute("aria-current", "true");
    else tr.removeAttribute("aria-current");
  });
  await showTranscript(id);
}

function closeStream() {
  openId = null;
  if (follow) follow.abort();
  follow = null;
  $("detail").hidden = true;
}

$("detail-close").addEventListener("click", closeStream);
$("detail-cancel").addEventListener("click", async () => {
  if (!openId) return;
  await cancelStream(openId);
  await showTranscript(openId);
});

async function showTranscript(id) {
  let t;
  try {
    t = await json(`/v1/streams/${encodeURIComponent(id)}`);
  } catch (e) {
    $("detail-status").textContent = `This stream could not be read: ${e.message}`;
    return;
  }
  if (id !== openId) return;
  $("detail-status").textContent = `${t.model} · ${describe(t.status, t.reason)}${t.detail ? ` — ${t.detail}` : ""}`;
  $("detail-status").className = `status state ${t.status}`;
  $("detail-cancel").hidden = t.status !== "streaming";
  const request = $("detail-request");
  request.replaceChildren(
    ...((t.request && t.request.messages) || []).map((m) => {
      const li = document.createElement("li");
      li.className = `msg ${m.role === "user" ? "user" : ""}`;
      li.textContent = `${m.role}: ${typeof m.content === "string" ? m.content : JSON.stringify(m.content)}`;
      return li;
    }),
  );
  renderMarkdown(t.content, $("detail-answer"));
  drawTimeline(t);
  if (t.status === "streaming" && !follow) followStream(id, t.chunks.length ? t.chunks[t.chunks.length - 1].seq : 0, t.content);
}

/** Follows a running stream: its text live, its timeline refreshed from the transcript. */
async function followStream(id, after, content) {
  follow = new AbortController();
  const signal = follow.signal;
  let text = content;
  const timer = setInterval(() => {
    if (openId === id) showTranscript(id);
  }, REFRESH_MS);
  try {
    const response = await api(`/v1/streams/${encodeURIComponent(id)}/events?after=${after}`, { signal });
    if (response.ok) {
      await readEvents(response, (event) => {
        if (event.data === "[DONE]" || openId !== id) return;
        try {
          const data = JSON.parse(event.data);
          const choice = data.choices && data.choices[0];
          if (choice && choice.delta && choice.delta.content) {
            text += choice.delta.content;
            renderMarkdown(text, $("detail-answer"));
          }
        } catch (_) {
          // Not a chunk: skipped.
        }
      });
    }
  } catch (_) {
    // Closed or aborted: the transcript below says how it ended.
  } finally {
    clearInterval(timer);
    if (follow && follow.signal === signal) follow = null;
    if (openId === id && !signal.aborted) showTranscript(id);
  }
}

const SVG = "http://www.w3.org/2000/svg";

function svg(name, attrs, parent) {
  const el = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  parent.append(el);
  return el;
}

/**
 * The timeline of chunk arrivals: a tick per chunk at its offset from the request, the wait for
 * the first one shaded, stalls (gaps much longer than usual) marked, and where it ended.
 */
function drawTimeline(t) {
  const chart = $("timeline");
  chart.replaceChildren();
  const offsets = t.chunks.map((c) => c.offset_ms);
  const end = t.timings.total_ms != null ? t.timings.total_ms : Math.max(offsets.length ? offsets[offsets.length - 1] : 0, Date.now() - t.created * 1000);
  const span = Math.max(end, 1);
  const W = 600;
  const x = (v) => 4 + (v / span) * (W - 8);
  const first = offsets.length ? offsets[0] : null;
  svg("rect", { class: "wait", x: x(0), y: 8, width: Math.max(x(first != null ? first : end) - x(0), 1), height: 52 }, chart);
  const gaps = offsets.slice(1).map((o, i) => [offsets[i], o - offsets[i]]);
  const usual = median(gaps.map(([, g]) => g));
  const threshold = Math.max(usual * 5, 250);
  let longest = null;
  for (const [at, gap] of gaps) {
    if (gap >= threshold) svg("rect", { class: "stall", x: x(at), y: 8, width: Math.max(x(at + gap) - x(at), 1), height: 52 }, chart);
    if (!longest || gap > longest[1]) longest = [at, gap];
  }
  for (const o of offsets) svg("line", { class: "tick", x1: x(o), x2: x(o), y1: 16, y2: 52 }, chart);
  const done = t.status !== "streaming";
  if (done) svg("line", { class: `end ${t.status === "completed" ? "" : "bad"}`, x1: x(end), x2: x(end), y1: 4, y2: 64 }, chart);
  const label = svg("text", { x: 6, y: 76 }, chart);
  label.textContent = `0`;
  const right = svg("text", { x: W - 6, y: 76, "text-anchor": "end" }, chart);
  right.textContent = `${ms(end)}${done ? ` · ${STATES[t.status] || t.status}` : " · running"}`;
  const parts = [`${offsets.length} chunks`, `first token ${ms(first)}`];
  if (longest && longest[1] >= threshold) parts.push(`longest stall ${ms(longest[1])} at ${ms(longest[0])}`);
  parts.push(done ? `ended ${describe(t.status, t.reason)} at ${ms(end)}` : "still running");
  const caption = parts.join(" · ");
  chart.setAttribute("aria-label", `Timeline of chunk arrivals: ${caption}`);
  $("timeline-caption").textContent = caption;
}

function median(values) {
  if (!values.length) return 0;
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)];
}

// ---------------------------------------------------------------- views

function showView(name) {
  const streams = name === "streams";
  $("chat").hidden = streams;
  $("streams").hidden = !streams;
  $("tab-chat").setAttribute("aria-pressed", String(!streams));
  $("tab-streams").setAttribute("aria-pressed", String(streams));
  clearInterval(refreshTimer);
  refreshTimer = null;
  if (streams) {
    loadStreams();
    refreshTimer = setInterval(loadStreams, REFRESH_MS);
  } else {
    closeStream();
  }
  history.replaceState(null, "", streams ? "#streams" : "#");
}

$("tab-chat").addEventListener("click", () => showView("chat"));
$("tab-streams").addEventListener("click", () => showView("streams"));

// ---------------------------------------------------------------- start

async function start() {
  let models;
  try {
    models = await json("/v1/models");
  } catch (e) {
    if (!(e instanceof ApiFailure && e.status === 401)) showAlert(`The gateway did not answer: ${e.message}`);
    return;
  }
  if (apiKey) $("key-form").hidden = false;
  const select = $("model");
  const wanted = localStorage.getItem(MODEL);
  select.replaceChildren(
    ...models.data.map((m) => {
      const option = document.createElement("option");
      option.value = option.textContent = m.id;
      option.selected = m.id === wanted;
      return option;
    }),
  );
  renderChat();
  showView(location.hash === "#streams" ? "streams" : "chat");
  // An answer that was streaming when the page went away picks up where it was.
  const items = $("messages").children;
  const last = items[items.length - 1];
  if (last && !inFlight && last.msg.role === "assistant" && last.msg.status === "streaming") resume(last);
}

$("key").value = apiKey;
$("extra").value = localStorage.getItem(EXTRA) || "";
start();
