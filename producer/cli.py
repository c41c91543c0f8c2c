"""``smartdiff submit | status | wait | cancel``: the client on the command line. ``--json`` for scripts."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from smartdiff.farm.codes import JobState
from smartdiff.pipeline.params import add_request_arguments, request_from_args


def add_submit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", required=True)
    add_request_arguments(parser)
    parser.add_argument("--priority", type=int, default=5, help="0..9, 9 the most urgent (default 5)")
    parser.add_argument("--job-id", help="your own id: submitting it again returns the same job")
    parser.add_argument("--queue-anyway", action="store_true", help="queue even if no worker is live")
    parser.add_argument("--wait", action="store_true", help="wait for the job and print its record")
    parser.add_argument("--timeout", type=float, help="seconds to wait at most")
    parser.add_argument("--json", action="store_true")


def add_id_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job_id")
    parser.add_argument("--json", action="store_true")


def add_wait_arguments(parser: argparse.ArgumentParser) -> None:
    add_id_arguments(parser)
    parser.add_argument("--timeout", type=float)


def _print(record: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(record, ensure_ascii=False))
        return
    line = f"{record['id']}  {record['state']}"
    if record["state"] == JobState.RUNNING:
        line += f"  {record['stage']} {record['step']}/{record['steps']}"
    if record.get("error_code"):
        line += f"  {record['error_code']}: {record['error_message']}"
    if record.get("result", {}).get("url"):
        line += f"\n  {record['result']['url']}"
    print(line)


def _failed(error, as_json: bool) -> int:
    if as_json:
        print(json.dumps({"error": {"code": error.code, "message": error.message}, "record": error.record}))
    else:
        print(f"error: {error}", file=sys.stderr)
    return 1


def _wait(job, timeout: float | None, as_json: bool) -> int:
    from smartdiff.producer.client import FarmError

    try:
        _print(job.wait(timeout=timeout), as_json)
        return 0
    except FarmError as error:
        return _failed(error, as_json)


def run_submit(args: argparse.Namespace) -> int:
    from smartdiff.producer.client import Client, FarmError

    params = request_from_args(args)
    prompt = params.pop("prompt")
    try:
        job = Client().submit(
            args.profile,
            prompt,
            priority=args.priority,
            queue_anyway=args.queue_anyway,
            job_id=args.job_id,
            **params,
        )
    except FarmError as error:
        return _failed(error, args.json)
    if args.wait:
        return _wait(job, args.timeout, args.json)
    _print(job.status(), args.json)
    return 0


def run_status(args: argparse.Namespace) -> int:
    from smartdiff.producer.client import Client, FarmError

    try:
        _print(Client().job(args.job_id).status(), args.json)
    except FarmError as error:
        return _failed(error, args.json)
    return 0


def run_wait(args: argparse.Namespace) -> int:
    from smartdiff.producer.client import Client

    return _wait(Client().job(args.job_id), args.timeout, args.json)


def run_cancel(args: argparse.Namespace) -> int:
    from smartdiff.producer.client import Client, FarmError

    try:
        state = Client().job(args.job_id).cancel()
    except FarmError as error:
        return _failed(error, args.json)
    print(json.dumps({"id": args.job_id, "state": state}) if args.json else f"{args.job_id}  {state}")
    return 0


SUBCOMMANDS = {
    "submit": (add_submit_arguments, run_submit),
    "status": (add_id_arguments, run_status),
    "wait": (add_wait_arguments, run_wait),
    "cancel": (add_id_arguments, run_cancel),
}
