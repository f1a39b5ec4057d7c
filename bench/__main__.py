"""Run every benchmark in turn (``make bench``); each prints its own figures."""

from __future__ import annotations

import importlib
import subprocess
import sys

BENCHMARKS = ("message_build", "intake", "scheduler", "webhooks", "e2e")


def main() -> int:
    failed = []
    for name in BENCHMARKS:
        try:
            importlib.import_module(f"bench.{name}")
        except ImportError as exc:
            print(f"== bench.{name}: not available ({exc})")
            continue
        print(f"== bench.{name}", flush=True)
        result = subprocess.run([sys.executable, "-m", f"bench.{name}"], check=False)
        if result.returncode != 0:
            failed.append(name)
        print(flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
