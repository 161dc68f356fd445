"""Video question answering: MSVD-QA and MSRVTT-QA (test), as LAVIS' InstructBLIP configs run them.

Each video is shown as 4 frames (option `num_frames`) spread uniformly over it, each frame an image of its
own ("<image> <image> <image> <image> Question: {} Short Answer:"), and the answer is generated with the
QA decoding settings (beam 5, length penalty -1; at most 30 new tokens for MSVD and 10 for MSRVTT, as in
the two LAVIS configs) and scored by exact match after the VQA normalisation (LAVIS' GQA task). LAVIS
samples its frames at random around the middle even at evaluation; uniform sampling, the middle frame of
each of 4 equal segments, keeps runs repeatable.

Data in LAVIS' layout: `qa_test.json` (option `file`), a list of {video, question, answer, question_id},
`video` relative to option `videos`. Videos are read with PyAV; option `frames` names a folder of frames
extracted beforehand instead, one folder per video named by the video's file name without extension.
"""

from __future__ import annotations

import functools
import io
import re
from dataclasses import dataclass
from pathlib import Path

from morph_lightning.data_modules.instruct import IMAGE_MARK
from morph_lightning.data_modules.transforms import BadImage
from morph_lightning.evaluation.tasks.common import need, read_json
from morph_lightning.evaluation.tasks.vqa import QA_DECODING, QA_PROMPT, OpenQATask, QAItem

FRAME_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def sample_indices(total: int, count: int) -> list[int]:
    """`count` frame indices spread uniformly over `total` frames: the middle of each of `count` equal
    segments (a frame repeats when the video is shorter than `count`)."""
    return [min(total - 1, int((k + 0.5) * total / count)) for k in range(count)]


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@functools.lru_cache(maxsize=8)  # the frames of a video are asked for one after another
def video_frames(path: str, count: int) -> tuple[bytes, ...]:
    """`count` frames sampled uniformly from the video at `path`, PNG-encoded; `BadImage` when it cannot
    be read."""
    try:
        import av
    except ImportError:
        raise ImportError("reading videos needs PyAV: pip install av") from None
    if not Path(path).is_file():
        raise BadImage("missing", path)
    try:
        with av.open(path) as container:
            total = container.streams.video[0].frames
        if not total:  # the container does not store the count: count the packets, without decoding them
            with av.open(path) as container:
                total = sum(1 for packet in container.demux(video=0) if packet.size)
        if not total:
            raise BadImage("corrupt", f"{path}: no video frames")
        wanted = sample_indices(total, count)
        picked: dict[int, bytes] = {}
        with av.open(path) as container:
            for k, frame in enumerate(container.decode(video=0)):
                if k in wanted:
                    picked[k] = _png(frame.to_image())
                if k >= wanted[-1]:
                    break
    except (av.FFmpegError, IndexError) as err:  # IndexError: no video stream
        raise BadImage("corrupt", f"{path}: {err}") from None
    if not picked:
        raise BadImage("corrupt", f"{path}: no frames decoded")
    last = picked[max(picked)]  # the stored count can exceed what decodes; repeat the last frame read
    return tuple(picked.get(k, last) for k in wanted)


@dataclass(frozen=True)
class VideoFrame:
    """Frame `index` of `count` sampled from a video: a picklable reader of PNG bytes for a `Request`."""

    path: str
    index: int
    count: int

    def __call__(self) -> bytes:
        return video_frames(self.path, self.count)[self.index]


def _natural(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


@dataclass(frozen=True)
class FolderFrame:
    """Frame `index` of `count` sampled from a folder of extracted frames, in natural name order."""

    folder: str
    index: int
    count: int

    def __call__(self) -> bytes:
        folder = Path(self.folder)
        files = sorted((p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES), key=_natural)
        if not files:
            raise BadImage("missing", f"no frames in {folder}")
        return files[sample_indices(len(files), self.count)[self.index]].read_bytes()


class VideoQA(OpenQATask):
    OPTIONS = {**QA_DECODING, "file": "qa_test.json", "videos": "videos", "frames": "", "num_frames": 4}

    def load(self) -> list[QAItem]:
        rows, where, n = read_json(self.path("file")), str(self.path("file")), self.options["num_frames"]
        frames = self.data / self.options["frames"] if self.options["frames"] else None
        if frames is not None and not frames.is_dir():
            raise FileNotFoundError(f"{self.name}: no frames folder {frames}")
        videos = self.folder("videos")
        items = []
        for k, row in enumerate(rows):
            need(row, ("video", "question", "answer"), where)
            if frames is not None:
                sources = [FolderFrame(str(frames / Path(row["video"]).stem), i, n) for i in range(n)]
            else:
                if k == 0 and not (videos / row["video"]).is_file():
                    raise FileNotFoundError(
                        f"{self.name}: no video {videos / row['video']} (--option videos=DIR)"
                    )
                sources = [VideoFrame(str(videos / row["video"]), i, n) for i in range(n)]
            text = " ".join([IMAGE_MARK] * n) + " " + QA_PROMPT.format(row["question"])
            items.append(QAItem(str(row.get("question_id", k)), sources, text, row["answer"]))
        return items


class MSVDQA(VideoQA):
    name = "msvd-qa"
    column = "MSVD-QA"
    PAPER = {"InstructBLIP": 44.3, "Morph-Tokens": 50.9}
    OPTIONS = {**VideoQA.OPTIONS, "max_new_tokens": 30}


class MSRVTTQA(VideoQA):
    name = "msrvtt-qa"
    column = "MSRVTT-QA"
    PAPER = {"InstructBLIP": 25.6, "Morph-Tokens": 37.2}
