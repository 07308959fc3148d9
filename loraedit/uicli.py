"""`loraedit ui`: the command that serves the web page (loraedit/ui.py).

    loraedit ui [--host 127.0.0.1] [--port 7860] [--runs runs] [--model DIR] [--share]

Kept apart from the page so the CLI never imports gradio: registering this command costs
nothing, and a person without `pip install loraedit[ui]` gets one line saying so.
"""

from __future__ import annotations

import os
from pathlib import Path

from loraedit.errors import InputError


def register(subparsers) -> None:
    help = "the whole edit in a web page: upload, check the region, train, watch, download (needs loraedit[ui])"
    p = subparsers.add_parser("ui", help=help, description=help)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--runs", default="runs", help="folder of the run folders the page starts and lists (default runs)")
    p.add_argument("--model", default=None, help="model folder to fill in (default: none; the page offers the bundled toy model)")
    p.add_argument("--share", action="store_true", help="also ask Gradio for a public share link (off by default)")
    p.set_defaults(func=run_ui)


def run_ui(args) -> int:
    if not 0 < args.port < 65536:
        raise InputError(f"--port {args.port}: must be between 1 and 65535")
    from loraedit.cli import check_out

    check_out(args.runs, "folder of the run folders", flag="--runs")  # a file, or not writable: one line
    runs = Path(args.runs)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local tool
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise InputError("the web UI needs Gradio: pip install 'loraedit[ui]'") from None
    from loraedit import ui

    return ui.serve(host=args.host, port=args.port, runs=runs, model=args.model, share=args.share)
