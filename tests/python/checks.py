"""Runs a list of checks, one line each, then a closing 'N passed, N failed' line; exits
non-zero on any failure. Shared by the SDK test files."""

import sys
import traceback


def run(name, checks, versions):
    passed = failed = 0
    for check in checks:
        try:
            check()
            print(f"{name} {check.__name__} ... ok")
            passed += 1
        except Exception:  # noqa: BLE001 - report every failure, then fail the run
            print(f"{name} {check.__name__} ... FAILED")
            traceback.print_exc()
            failed += 1
    print(f"{name} ({versions}): {passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
