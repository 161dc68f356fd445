"""`python -m morph_lightning chat (--checkpoint FILE | --export DIR) --out DIR [--image PATH]`: talk to
a trained model in the terminal, one line per turn, and edit an image over several turns.

The session keeps a current image: the one `--image` or `/image PATH` names, replaced by the last image
the model generates. A plain line is sent as one user turn, with the current image put before it as
`<image>` when there is one and the line has no `<image>` of its own. `/edit TEXT` sends the editing
instruction in the template of the paper's (and the world's) editing data. Every generated image is saved
as `OUT/turn<NNN>-<k>.png` and becomes the current image, so edits chain. OUT must not hold an earlier
session's images: they are never overwritten.

Each line is a single-turn prompt: earlier turns are not sent, because the world's models are trained on
single-turn records; only the current image carries over. Lines are read from stdin, which may be a pipe,
so a session can be scripted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

from morph_lightning.data_modules.sources.templates import EDIT
from morph_lightning.inference import (
    Answerer,
    InferenceError,
    add_model_arguments,
    chat_prompt,
    save_png,
    write_new,
)

COMMANDS = """commands:
  TEXT          one user turn (the current image goes first, as <image>)
  /edit TEXT    edit the current image: "What will this image be like with the editing instruction: TEXT"
  /image PATH   make PATH the current image
  /save PATH    save the current image to PATH (its format from the suffix, PNG by default)
  /reset        no current image
  /help         this list
  /quit         end the session (so does end of input)"""


class Session:
    """The current image and the turn count; `handle` runs one line."""

    def __init__(self, answerer: Answerer, out: Path) -> None:
        self.answerer, self.out = answerer, out
        self.image: Path | None = None
        self.turn = 0

    def handle(self, line: str) -> bool:
        """Run one line; False when the session ends."""
        command, _, rest = line.partition(" ")
        rest = rest.strip()
        if not line.startswith("/"):
            self._ask(line)
        elif command == "/quit":
            return False
        elif command == "/help":
            print(COMMANDS)
        elif command == "/reset":
            self.image = None
            print("no current image")
        elif command == "/image":
            self.set_image(rest)
        elif command == "/save":
            self._save(rest)
        elif command == "/edit":
            if self.image is None:
                raise InferenceError("/edit needs a current image: /image PATH first")
            # The template ends the instruction with its own full stop.
            self._ask(EDIT.format(instruction=_needs(rest, "/edit TEXT").rstrip(".")))
        else:
            raise InferenceError(f"unknown command {command} (/help lists them)")
        return True

    def set_image(self, path: str) -> None:
        self.answerer.read_image(_needs(path, "/image PATH"))  # fails here, not at the next turn
        self.image = Path(path)
        print(f"current image: {self.image}")

    def _save(self, path: str) -> None:
        if self.image is None:
            raise InferenceError("no current image to save")
        target, source = Path(_needs(path, "/save PATH")), self.image
        # re-encoded, not copied: a JPEG given with /image saved as .png must be a PNG
        image = Image.open(source)
        write_new(
            target,
            lambda tmp: image.save(
                tmp, format=Image.registered_extensions().get(target.suffix.lower(), "PNG")
            ),
        )
        print(f"saved {target}")

    def _ask(self, text: str) -> None:
        images = [] if self.image is None else [self.answerer.read_image(self.image)]
        prompt = chat_prompt(text, len(images))
        self.turn += 1
        answer = self.answerer.answer([(prompt, images)])[0]
        print(answer.text)
        for k, pixels in enumerate(answer.images):
            path = self.out / f"turn{self.turn:03d}-{k}.png"
            save_png(pixels, path)
            self.image = path
            print(f"saved {path}")


def _needs(argument: str, usage: str) -> str:
    if not argument:
        raise InferenceError(f"usage: {usage}")
    return argument


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m morph_lightning chat", description=__doc__.split("\n\n")[0]
    )
    add_model_arguments(parser)
    parser.add_argument("--image", help="the current image to start with")
    parser.add_argument("--out", required=True, help="where generated images are saved")
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        if any(out.glob("turn*.png")):
            raise InferenceError(
                f"{out} holds an earlier session's images: not overwritten (choose another --out)"
            )
        session = Session(Answerer(args), out)
        if args.image:
            session.set_image(args.image)
    except InferenceError as err:
        raise SystemExit(f"chat: {err}") from None
    _loop(session)


def _loop(session: Session) -> None:
    interactive = sys.stdin.isatty()
    print("/help lists the commands", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:  # end of input
            break
        line = line.strip()
        if not line:
            continue
        if not interactive:  # a scripted session's transcript shows what was asked
            print(f"> {line}")
        try:
            if not session.handle(line):
                break
        except InferenceError as err:
            sys.stdout.flush()  # the error lands after the line that caused it, even through a pipe
            print(f"error: {err}", file=sys.stderr)
