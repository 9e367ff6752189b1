"""The ``metarl`` command line as a user reads it."""

from __future__ import annotations

import argparse
import re

from metarl_ros.cli.main import build_parser

RST = re.compile(r"``|:(func|class|mod|meth|attr|data):`")


def _all_help(parser: argparse.ArgumentParser) -> dict[str, str]:
    texts = {parser.prog: parser.format_help()}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                texts.update(_all_help(sub))
    return texts


def test_help_shows_no_raw_rst_markup():
    for prog, text in _all_help(build_parser()).items():
        assert not RST.search(text), f"{prog} --help shows reST markup:\n{text}"
