"""--help says every option's default: nothing silently means something (`--n` means all items)."""

import argparse

from cogumi.cli import build_parser


def test_every_option_with_a_default_shows_it():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for verb, sp in sub.choices.items():
        text = sp.format_help()
        for action in sp._actions:
            if action.option_strings and action.default not in (None, argparse.SUPPRESS) \
                    and action.default is not False:
                assert "default" in (action.help or "").lower(), (verb, action.option_strings)
        if verb == "eval":
            assert "(default: 512)" in text.replace("\n", " ").replace("  ", " ")      # --max-new-tokens
            assert "default: all items" in " ".join(text.split())                        # --n


def test_help_still_renders_for_every_verb(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for sp in sub.choices.values():
        assert sp.format_help()          # no %-formatting error from a help string
