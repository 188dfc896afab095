"""One rank of a multi-process run for tests/execute/test_distributed.py (run as a script per rank).

argv: SCENARIO RANK SIZE PORT. Prints one JSON line: what the rank did and the error it ended with.
"""

from __future__ import annotations

import json
import os
import sys
import time

from dsckpt.errors import DsckptError
from dsckpt.execute import distributed
from dsckpt.execute.distributed import World, coordinator


def main() -> None:
    scenario, rank, size, port = sys.argv[1], *map(int, sys.argv[2:5])
    distributed.LOST_AFTER_SECONDS = 2.0
    events: list[str] = []
    try:
        with coordinator(World(rank, size, "127.0.0.1", port)) as coord:
            plan = "other" if scenario == "disagree" and rank == 2 else "same"
            coord.agree("plan", plan)
            staging = coord.hand_out("staging", lambda: "/tmp/staging-x", str, str)
            events.append(f"staging {staging}")
            error: BaseException | None = None
            try:
                if scenario == "fail" and rank == 1:
                    raise OSError(28, "No space left on device")
                if scenario == "killed" and rank == 1:
                    os._exit(9)
                if scenario == "leader-killed" and rank == 0:
                    os._exit(9)
                time.sleep(0.2 * rank)  # shares end at different times
                events.append("wrote")
            except OSError as exc:
                error = exc
            if coord.world.is_leader:
                try:
                    coord.report(error)
                except BaseException:
                    events.append("discard")
                    raise
                events.append("commit")
                coord.committed()
            else:
                coord.report(error)
        print(json.dumps({"events": events, "error": None}))
    except DsckptError as exc:
        print(json.dumps({"events": events, "error": str(exc)}))


if __name__ == "__main__" and sys.argv[1] != "cli":
    main()


def cli() -> None:
    """argv: cli FAULT ARGS...: the dsckpt CLI in this process, as one rank of a launch (the
    launcher's variables are in the environment); FAULT makes rank 1's share fail ("raise"),
    or kills it mid-share ("kill"), or is "none"."""
    fault, args = sys.argv[2], sys.argv[3:]
    if fault != "none" and os.environ["RANK"] == "1":
        from dsckpt.execute import executor

        def broken(*_: object, **__: object) -> None:
            if fault == "kill":
                os._exit(9)
            raise OSError(5, "Input/output error")

        executor.write_file = broken  # type: ignore[assignment]
    from dsckpt.cli.app import main as dsckpt_main

    sys.argv = ["dsckpt", *args]
    dsckpt_main()


if __name__ == "__main__" and sys.argv[1] == "cli":
    cli()
