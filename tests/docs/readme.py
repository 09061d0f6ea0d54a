"""The README's shell commands, and the documented substitutions that let each run here.

Every fenced ``bash`` block of README.md is read command by command (continuation lines joined,
trailing comments dropped). :func:`adapt` turns one into the command this machine runs, with
only the substitutions listed in :data:`SUBSTITUTIONS` (each with its reason); a command that
cannot run here at all is in :data:`NOT_HERE` with its reason. Everything else runs as written,
in a workspace whose placeholder files (``scene.tif``, ``imgs/``...) are made from the real
Sentinel-2 data in ``../shared/data`` (:mod:`tests.docs.workspace`).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"

_FENCE = re.compile(r"^```(bash|sh|shell|console)\s*$")


@dataclass(frozen=True)
class Command:
    """One README command: the line it starts on and its text (continuations joined)."""

    line: int
    text: str

    @property
    def id(self) -> str:
        return f"L{self.line}:{self.text[:60]}"


def readme_commands(text: str | None = None) -> list[Command]:
    """Every command of every fenced shell block of README.md, in order."""
    lines = (README.read_text() if text is None else text).splitlines()
    out: list[Command] = []
    inside, start, buf = False, 0, ""
    for i, raw in enumerate(lines, 1):
        if not inside:
            inside = bool(_FENCE.match(raw.strip()))
            continue
        if raw.strip().startswith("```"):
            inside = False
            continue
        line = _strip_comment(raw).rstrip()
        if not buf:
            start = i
        if line.endswith("\\"):
            buf += line[:-1].strip() + " "
            continue
        buf += line.strip()
        if buf:
            out.append(Command(start, buf))
        buf = ""
    return out


def _strip_comment(line: str) -> str:
    """``line`` without a trailing ``# comment`` (a ``#`` at the start or after whitespace,
    outside quotes)."""
    for m in re.finditer(r"(^|\s)#", line):
        before = line[: m.start()]
        if before.count('"') % 2 == 0 and before.count("'") % 2 == 0:
            return before
    return line


# ---------------------------------------------------------------------------------------------
# What cannot run here, and the substitutions that let the rest run
# ---------------------------------------------------------------------------------------------

#: (pattern, reason): README commands this machine cannot run at all.
NOT_HERE: list[tuple[str, str]] = [
    (r"^\. \.venv/bin/activate && python -m pytest", "the test suite itself (CI runs it as the README says)"),
]

#: (pattern, reason): commands that need a CUDA GPU; they run (as written) where one is visible.
NEEDS_GPU: list[tuple[str, str]] = [
    (r"--device cuda\b", "asks for a CUDA GPU"),
]


@dataclass(frozen=True)
class Substitution:
    """A documented change to a README command: where it applies, what it does, why."""

    applies: str  # regex on the command
    change: Callable[[str, dict], str]
    why: str


def _append(*args: str) -> Callable[[str, dict], str]:
    return lambda cmd, ctx: f"{cmd} {' '.join(args)}"


def _sub(pattern: str, repl: str) -> Callable[[str, dict], str]:
    return lambda cmd, ctx: re.sub(pattern, repl.format(**ctx), cmd)


#: Sizes that make one pretraining step of the paper's Swin-B + ViT-B teacher fit 2 CPU cores.
PRETRAIN_CAPS = (
    "--max-steps 1",
    "--set batch_size=2",
    "--set data.num_workers=0",
    "--set crops.global_size=112",
    "--set crops.local_size=48",
    "--set crops.local_number=2",
)

SUBSTITUTIONS: list[Substitution] = [
    Substitution(
        r"^python3 -m venv .* pip install -e \"\.\[dev\]\" && ",
        _sub(r"^python3 -m venv .* pip install -e \"\.\[dev\]\" && ", ""),
        "the installation is what CI does before the suite; the command after it runs here",
    ),
    Substitution(
        r"--gpus \d+", _sub(r"--gpus \d+", "--gpus 2 --device cpu"), "--gpus N -> 2 CPU processes (gloo)"
    ),
    Substitution(
        r"^torchrun ",
        lambda cmd, ctx: (
            re.sub(
                r"--nproc-per-node \d+",
                "--nproc-per-node 2",
                re.sub(r"--nnodes \d+", "--nnodes 1", cmd).replace(":29500", f":{ctx['port']}"),
            )
            + " --device cpu"
        ),
        "several nodes of GPUs -> one node, 2 CPU processes (gloo); $RANK=0, $MASTER=127.0.0.1",
    ),
    Substitution(
        r"--stac https?://\S+",
        _sub(r"--stac https?://\S+", "--stac {stac}"),
        "a STAC API on the web -> the one served on 127.0.0.1, whose sentinel-2-l2a items are the two "
        "OSCD Paris dates (band files as COGs) dated June and July 2024",
    ),
    Substitution(
        r"^sbatch --array=\S+ --wrap ",
        _sub(r"^sbatch --array=\S+ --wrap ", "SLURM_ARRAY_TASK_ID=0 bash -c "),
        "a Slurm job array -> its task 0, run here (no Slurm on this machine)",
    ),
    Substitution(
        r"^deo bench download ",
        lambda cmd, ctx: f"{cmd} --source {ctx['mirror']}",
        "from the local GEO-Bench mirror the download tests serve on 127.0.0.1, not Hugging Face",
    ),
    Substitution(
        r"^deo bench --suite geobench(?!.*--limit)",
        _append("--limit 8", "--set linear.epochs=2", "--set segmentation.epochs=1", "--set knn.k=3"),
        "big sizes -> 8 samples per split, 2 linear-probe epochs, 1 segmentation epoch",
    ),
    Substitution(
        r"^deo bench --suite oscd(?!.*--limit)",
        _append("--limit 1"),
        "4 OSCD cities with Swin-B -> 1",
    ),
    Substitution(
        r"^deo bench --suite throughput",
        lambda cmd, ctx: (
            re.sub(r"--batch-size \d+", "--batch-size 2", cmd) + " --set throughput.iterations=2"
        ),
        "a batch of 64 Swin-B images -> 2, 2 timed iterations",
    ),
    Substitution(
        r"(^| )deo_cli pretrain |^deo pretrain (?!export)(?!.*--resume)",
        _append(*PRETRAIN_CAPS),
        "a full pretraining -> 1 step of 2 samples per process, 2 global crops of 112 px and 2 local of 48",
    ),
    Substitution(
        r"^deo pretrain (?!export).*--resume",
        _append("--max-steps 2"),
        "continue the 1-step run above by one step",
    ),
    Substitution(
        r"^deo pretrain export .*checkpoint-\d+\.pt",
        lambda cmd, ctx: re.sub(
            r"(\S+)/checkpoint-\d+\.pt", lambda m: ctx["last_checkpoint"](m.group(1)), cmd
        ),
        "checkpoint-00100000.pt -> the last checkpoint of the short run above",
    ),
    Substitution(
        r"^deo segment train ",
        _append("--epochs 1", "--set warmup_epochs=0"),
        "50 epochs -> 1",
    ),
    Substitution(
        r"^deo detect-change train ",
        _append("--epochs 1", "--set warmup_epochs=0"),
        "50 epochs -> 1",
    ),
]


def adapt(cmd: Command, ctx: dict) -> tuple[str | None, str | None, list[str]]:
    """``(command to run, reason it cannot run here, substitutions applied)``."""
    for pattern, reason in NOT_HERE:
        if re.search(pattern, cmd.text):
            return None, reason, []
    for pattern, reason in NEEDS_GPU:
        if re.search(pattern, cmd.text) and not ctx.get("cuda"):
            return None, f"needs a CUDA GPU ({reason}); it runs as written on a machine with one", []
    text, used = cmd.text, []
    for s in SUBSTITUTIONS:
        if re.search(s.applies, text):
            text = s.change(text, ctx)
            used.append(s.why)
    return text, None, used


#: Options whose value is a file or folder the command writes.
OUTPUT_OPTIONS = ("-o", "--out", "--preview", "--polygons", "--probabilities")


def outputs(text: str) -> list[str]:
    """The paths a command's output options name (checked to exist after it ran)."""
    try:
        tokens = shlex.split(text)
    except ValueError:
        return []
    return [tokens[i + 1] for i, t in enumerate(tokens[:-1]) if t in OUTPUT_OPTIONS]
