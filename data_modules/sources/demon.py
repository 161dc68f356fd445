"""The DEMON benchmark's prompt (Li et al., 2023; DCDmllm/Cheetah, `i4_cheetah_llama2.py`): how a sample of
its layout becomes the text a model reads. The `demon` evaluation task asks with it, and the world's
DEMON-format training records are written with it, so both read alike."""

from __future__ import annotations

import re

from morph_lightning.data_modules.instruct import IMAGE_MARK

PLACEHOLDER = re.compile(r"\{(?:image|table)#([1-9]\d*)\}")


def build_prompt(
    instruction: str, context: str, choices: list[str] | None, n_images: int
) -> tuple[str, list[int]]:
    """The official runner's prompt text with each `{image#k}` / `{table#k}` replaced by an `<image>` mark,
    and the 0-based index (into `images_path`) of the image of each mark, in mark order.

    The runner's text is `instruction + context` (no separator), then `Choice list:['a', 'b']. Your answer
    is:` when the sample has a choice list (joined with `', '`, nothing escaped, as that runner writes it)."""
    text = instruction + context
    if choices is not None:
        text += "Choice list:['" + "', '".join(choices) + "']. Your answer is:"
    order = [int(k) - 1 for k in PLACEHOLDER.findall(text)]
    if sorted(set(order)) != list(range(n_images)):
        named = sorted({k + 1 for k in order})
        raise ValueError(f"its placeholders name images {named} but images_path has {n_images}")
    return PLACEHOLDER.sub(IMAGE_MARK, text), order
