"""The `bit` command line of the engine: finetune, predict, eval, weights.

`build_parser()` is public so that the service can add its own commands (serve, worker,
...) to the same `bit` program without this package importing the service.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bit_core import weights
from bit_core.backends import BACKEND_CHOICES
from bit_core.checkpoint import LocalBaseStore
from bit_core.data import LabeledImages
from bit_core.export import ExportUnavailable
from bit_core.hyperrule import hyperrule
from bit_core.images import ImageDecodeError
from bit_core.npz import CheckpointError
from bit_core.reproducibility import DETERMINISTIC_ENV, deterministic_from_env
from bit_core.train import Progress, RunConfig

Handler = Callable[[argparse.Namespace], int]


class _ProgressBar:
    """A tqdm bar fed by the training loop's progress callback."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None

    def __call__(self, progress: Progress) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=progress.total_steps, unit="step", file=sys.stderr)
        self.bar.n = progress.step
        if progress.loss == progress.loss:  # NaN until a loss exists (linear mode extracting)
            postfix = {"loss": f"{progress.loss:.4f}", "lr": f"{progress.lr:.2e}"}
            self.bar.set_postfix(postfix, refresh=False)
        self.bar.set_description(f"{progress.images_per_s:.1f} img/s")
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _cmd_finetune(args: argparse.Namespace) -> int:
    from bit_core.holdout import HOLDOUT_MIN_PER_CLASS, holdout_split
    from bit_core.recipe import QualityOptions, resolve_base, run_finetune

    train = LabeledImages.from_folder(args.data)
    val = LabeledImages.from_folder(args.val, classes=train.classes) if args.val else None
    if args.holdout is not None:
        if val is not None:
            raise ValueError("give --val DIR or --holdout FRACTION, not both")
        split = holdout_split(train.labels, fraction=args.holdout, seed=args.seed)
        if split is None and args.holdout > 0:
            print(
                f"note: no hold-out: a class has fewer than {HOLDOUT_MIN_PER_CLASS} images; "
                "quality will be a cross-validated estimate",
                file=sys.stderr,
            )
        elif split is not None:
            train, val = train.subset(split[0]), train.subset(split[1])
            print(f"note: {len(val)} images held out; they never train", file=sys.stderr)
    if args.calibrate and val is None:
        raise ValueError(
            "--calibrate fits a temperature on held-out images: give --val or --holdout"
        )
    base = resolve_base(args.base, args.weights_dir)
    if base.npz_path is None:
        print(
            f"note: '{base.name}' has no pre-trained weights: training from scratch",
            file=sys.stderr,
        )
    plan = hyperrule(
        len(train),
        train.typical_hw(),
        arch=base.arch,
        mode=args.mode,
        batch_size=args.batch_size,
        base_lr=args.lr,
        total_steps=args.steps,
        precrop=args.precrop,
        crop=args.crop,
        mixup_alpha=args.mixup,
        resolution_rule=args.resolution,
    )
    config = RunConfig(
        seed=args.seed,
        deterministic=args.deterministic or deterministic_from_env(),
        device=args.device,
        precision=args.precision,
        micro_batch_size=args.micro_batch,
        compile=args.compile,
        eval_every=args.eval_every,
        num_workers=args.workers,
        checkpoint_every=args.checkpoint_every,
    )
    out = Path(args.out)
    if plan.mode == "linear":
        what = f"features at {plan.crop}px (and mirrored), then an L-BFGS head"
    else:
        what = (
            f"{plan.total_steps} steps of {plan.batch_size} at {plan.precrop}->{plan.crop}px, "
            f"lr {plan.base_lr:g}"
        )
    print(
        f"{len(train)} images, {len(train.classes)} classes, base {base.name} ({base.arch}), "
        f"mode {plan.mode}: {what}",
        file=sys.stderr,
    )
    for note in plan.notes:
        print(f"note: {note}", file=sys.stderr)
    bar = _ProgressBar(not args.quiet)
    try:
        _, info = run_finetune(
            train,
            base,
            plan,
            out,
            config=config,
            val=val,
            quality=QualityOptions(
                eval_every=args.eval_every, calibrate=args.calibrate, seed=args.seed
            ),
            checkpoint_path=out.with_name(out.name + ".ckpt.safetensors"),
            on_progress=bar,
            data=str(Path(args.data).resolve()),
            bases=LocalBaseStore(args.bases_dir) if args.share_base else None,
        )
    finally:
        bar.close()
    assert info is not None
    print(quality_line(info.metrics.get("quality", {})))
    print(f"model saved to {out}")
    if info.shared_base is not None:
        print(
            f"  (its head only; the base {info.shared_base['sha256'][:12]}… is shared, in "
            f"{LocalBaseStore(args.bases_dir).root}: `bit export --format bundle` makes a "
            "self-contained copy)"
        )
    return 0


def quality_line(quality: dict[str, Any]) -> str:
    """One line saying how good the model is, and what that figure is measured on."""
    kind = quality.get("kind")
    if kind == "holdout":
        line = (
            f"quality: held-out top-1 {quality['top1']:.3f}, top-5 {quality['top5']:.3f} "
            f"on {quality['count']} images that never trained"
        )
        calibration = quality.get("calibration")
        if calibration:
            line += (
                f"; temperature {calibration['temperature']:.3f} "
                f"(ECE {calibration['ece_before']:.3f} -> {calibration['ece_after']:.3f})"
            )
        return line
    if kind == "cross_validated":
        return (
            f"quality: top-1 {quality['top1']:.3f} ± {quality['top1_std']:.3f} "
            f"({quality['method']}, {quality['folds']} folds, {quality['count']} images), "
            f"{quality['label']}"
        )
    return f"quality: none — {quality.get('label', 'nothing held out')}"


def _cmd_pretrain(args: argparse.Namespace) -> int:
    import shutil
    import subprocess
    import tempfile

    from bit_core import pretrain_run
    from bit_core.upstream import upstream_plan

    data = pretrain_run.load_data(args.data)
    plan = upstream_plan(
        len(data),
        len(data.classes),
        recipe=args.recipe,
        multi_label=data.multi_label,
        global_batch=args.global_batch,
        epochs=args.epochs,
        total_steps=args.steps,
        base_lr=args.lr,
        resolution=args.resolution,
        warmup_steps=args.warmup,
    )
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="bit-pretrain-"))
    pretrain_run.write_spec(
        run_dir,
        arch=args.arch,
        data=str(Path(args.data).resolve()),
        plan=plan,
        config=RunConfig(
            seed=args.seed,
            deterministic=args.deterministic or deterministic_from_env(),
            device=args.device,
            checkpoint_every=args.checkpoint_every,
        ),
    )
    print(
        f"{len(data)} images, {len(data.classes)} classes ({plan.loss} loss): "
        f"{plan.total_steps} steps of {plan.global_batch} on {args.nproc} process(es); "
        f"run directory {run_dir}",
        file=sys.stderr,
    )
    if args.nproc == 1:
        pretrain_run.main(run_dir)
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "1",
            "--nproc-per-node",
            str(args.nproc),
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            "127.0.0.1:0",
            "--max-restarts",
            str(args.max_restarts),
            "-m",
            "bit_core.pretrain_run",
            str(run_dir),
        ]
        if subprocess.run(command, check=False).returncode != 0:
            raise CommandFailed(f"the distributed run failed; see the output above and {run_dir}")
    shutil.copyfile(run_dir / pretrain_run.RESULT, args.out)
    print(f"base model written to {args.out} (official BiT .npz layout)")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from bit_core.export import model_directory
    from bit_core.predict import Predictor

    with model_directory(args.model) as directory:  # a model directory or a bundle
        predictor = Predictor.load(
            directory,
            device=args.device,
            backend=args.backend,
            bases=LocalBaseStore(args.bases_dir),
        )
    results = predictor.predict(list(args.images), top_k=args.top_k)
    if args.json:
        rows = [
            {"image": image, "predictions": [p.__dict__ for p in predictions]}
            for image, predictions in zip(args.images, results, strict=True)
        ]
        print(json.dumps(rows, indent=2))
        return 0
    for image, predictions in zip(args.images, results, strict=True):
        ranked = ", ".join(f"{p.label} {p.probability:.3f}" for p in predictions)
        print(f"{image}: {ranked}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from bit_core.checkpoint import load_model
    from bit_core.device import resolve_device
    from bit_core.evaluate import evaluate

    model, info = load_model(args.model)
    data = LabeledImages.from_folder(args.data, classes=info.classes)
    device = resolve_device(args.device)
    report = evaluate(model.prepare_for_inference().to(device), data, info.crop, device=device)
    if args.json:
        print(json.dumps(report.summary(), indent=2))
        return 0
    print(
        f"{report.count} images: top-1 {report.top1:.4f}, top-5 {report.top5:.4f}, "
        f"loss {report.loss:.4f}"
    )
    width = max(len(name) for name in report.classes)
    for name, p, r in zip(report.classes, report.precision, report.recall, strict=True):
        print(f"  {name:<{width}}  precision {p:.3f}  recall {r:.3f}")
    return 0


def _cmd_weights_pull(args: argparse.Namespace) -> int:
    entry = weights.pull(args.name, args.weights_dir, progress=not args.quiet)
    print(f"{entry.name}: {entry.path} sha256 {entry.sha256}")
    return 0


def _cmd_weights_import(args: argparse.Namespace) -> int:
    from bit_core.export import export_npz, is_bundle, model_directory

    if is_bundle(args.file):
        # A fine-tuned model's bundle becomes a base model: its weights in the official
        # layout (fine-tuning replaces the head), named after the file by default.
        import tempfile

        name = args.name or Path(args.file).name.split(".")[0]
        with model_directory(args.file) as directory, tempfile.TemporaryDirectory() as tmp:
            npz = export_npz(directory, Path(tmp) / f"{name}.npz")
            entry = weights.import_file(npz, args.weights_dir, name=name)
        print(f"{entry.name}: {entry.arch}, {entry.num_classes} classes, sha256 {entry.sha256}")
        return 0
    entry = weights.import_file(args.file, args.weights_dir, name=args.name)
    print(f"{entry.name}: {entry.arch}, {entry.num_classes} classes, sha256 {entry.sha256}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from bit_core.export import export

    suffix = {"bundle": ".zip", "npz": ".npz", "onnx": ".onnx"}[args.format]
    out = args.out or f"{Path(args.model).name.split('.')[0] or 'model'}{suffix}"
    if Path(out).resolve() == Path(args.model).resolve():
        raise ValueError(f"--out {out} is the model itself; pass another file name")
    export(args.model, args.format, out)
    print(f"{args.format} written to {out}")
    return 0


def _cmd_weights_list(args: argparse.Namespace) -> int:
    from bit_core.registry import OFFICIAL_MODELS

    installed = {entry.name: entry for entry in weights.list_installed(args.weights_dir)}
    print(f"weights directory: {args.weights_dir or weights.default_weights_dir()}")
    for entry in installed.values():
        print(f"  installed  {entry.name:<28} {entry.arch:<8} {entry.sha256[:12]}")
    for name, model in OFFICIAL_MODELS.items():
        if name not in installed:
            print(f"  available  {name:<28} {model.arch:<8} `bit weights pull {name}`")
    return 0


def _add_finetune(sub: Any) -> None:
    p = sub.add_parser("finetune", help="fine-tune a BiT model on an image folder")
    p.add_argument("data", help="ImageFolder directory: one sub-directory of images per class")
    p.add_argument(
        "--base",
        required=True,
        help="installed weights name, an .npz file, or an architecture to train "
        "from scratch (e.g. R26x1)",
    )
    p.add_argument(
        "--mode",
        choices=("full", "linear"),
        default="full",
        help="full fine-tuning (BiT-HyperRule) or a fast linear head (default full)",
    )
    p.add_argument(
        "--val", metavar="DIR", help="held-out ImageFolder with the same classes (never trains)"
    )
    p.add_argument(
        "--holdout",
        type=float,
        metavar="FRACTION",
        help="hold out this share of each class (0..0.5, seeded by --seed) when every class "
        "has at least 8 images; otherwise quality is a cross-validated estimate",
    )
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="fit a temperature on the held-out images; predict applies it",
    )
    p.add_argument("--out", default="bit-model", help="output model directory")
    p.add_argument(
        "--share-base",
        action="store_true",
        help="linear mode from pre-trained weights: store the backbone once in the bases "
        "folder and only the head (KB) in --out; models of one base then share it",
    )
    _bases_argument(p)
    p.add_argument("--batch-size", type=int, help="override the HyperRule batch (512)")
    p.add_argument("--lr", type=float, help="override the base learning rate")
    p.add_argument("--steps", type=int, help="override the total number of steps")
    p.add_argument("--precrop", type=int, help="override the resize side")
    p.add_argument("--crop", type=int, help="override the crop side")
    p.add_argument("--mixup", type=float, help="override the MixUp alpha")
    p.add_argument(
        "--resolution",
        choices=("paper", "official"),
        help="large-image resolution: paper 448/384, official code 512/480",
    )
    _add_seed_arguments(p)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="auto: bf16 autocast on CUDA, fp32 on a CPU; bf16 also pays on a CPU with "
        "AMX (Intel Sapphire Rapids and later), see BENCHMARKS.md",
    )
    p.add_argument("--micro-batch", type=int, help="micro-batch size (default: automatic)")
    p.add_argument("--compile", action="store_true", help="use torch.compile")
    p.add_argument("--eval-every", type=int, default=0, help="validate every N steps")
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=50,
        help="save a resumable checkpoint (OUT.ckpt.safetensors) every N steps; a run "
        "started again with the same arguments resumes from it",
    )
    p.add_argument("--workers", type=int, default=2, help="data loader processes")
    p.add_argument("--weights-dir", help="weights directory (default $BIT_HOME/weights)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_cmd_finetune)


def _add_seed_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--seed",
        type=_non_negative_int,
        default=0,
        help="every random draw of the run: initial weights, batches, augmentation, MixUp, "
        "hold-out (default 0); on a CPU the same seed gives the same weights",
    )
    p.add_argument(
        "--deterministic",
        action="store_true",
        help="deterministic algorithms (torch.use_deterministic_algorithms, cuDNN's "
        "deterministic kernels), so GPU runs repeat too, somewhat slower; also on with "
        f"{DETERMINISTIC_ENV}=1",
    )


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; give a seed of 0 or more")
    return value


def _bases_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bases-dir",
        help="folder of shared bases (default $BIT_HOME/bases)",
    )


def build_parser() -> tuple[argparse.ArgumentParser, Any]:
    """The `bit` parser and its sub-command group, for others to extend."""
    parser = argparse.ArgumentParser(prog="bit", description="Big Transfer (BiT) image models")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_finetune(sub)

    p = sub.add_parser("pretrain", help="pre-train a BiT model upstream (torchrun, local)")
    p.add_argument("data", help="ImageFolder directory, or a .csv/.jsonl manifest (uri, labels)")
    p.add_argument("--arch", required=True, help="architecture, e.g. R50x1 or R26x1")
    p.add_argument("--recipe", choices=("bit-s", "bit-m", "bit-l"), default="bit-m")
    p.add_argument("--steps", type=int, help="total steps (instead of the recipe's epochs)")
    p.add_argument("--epochs", type=float, help="override the recipe's epochs")
    p.add_argument("--global-batch", type=int, default=4096)
    p.add_argument("--lr", type=float, help="override the base lr (0.03 x batch / 256)")
    p.add_argument("--warmup", type=int, help="override the warmup steps")
    p.add_argument("--resolution", type=int, help="training resolution (default 224)")
    p.add_argument("--nproc", type=int, default=1, help="processes (GPUs) on this machine")
    p.add_argument("--max-restarts", type=int, default=3, help="elastic restarts on failure")
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--run-dir", help="directory for checkpoints and progress (resumable)")
    p.add_argument("--out", default="pretrained.npz", help="the resulting base model")
    _add_seed_arguments(p)
    p.add_argument("--device", default="auto")
    p.set_defaults(handler=_cmd_pretrain)

    p = sub.add_parser("predict", help="classify images with a trained model")
    p.add_argument("model", help="model directory written by `bit finetune`, or its bundle")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--backend",
        choices=BACKEND_CHOICES,
        default=os.environ.get("BIT_INFERENCE_BACKEND", "auto"),
        help="what runs the model: auto (the faster one measured for the device: "
        "BENCHMARKS.md), torch or onnxruntime (default $BIT_INFERENCE_BACKEND, else auto)",
    )
    _bases_argument(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=_cmd_predict)

    p = sub.add_parser("export", help="export a model: bundle, official .npz or ONNX")
    p.add_argument("model", help="model directory written by `bit finetune`, or a bundle")
    p.add_argument("--format", choices=("bundle", "npz", "onnx"), required=True)
    p.add_argument("--out", help="output file (default: the model's name + .zip/.npz/.onnx)")
    p.set_defaults(handler=_cmd_export)

    p = sub.add_parser("eval", help="evaluate a model on a labeled image folder")
    p.add_argument("model", help="model directory written by `bit finetune`")
    p.add_argument("data", help="ImageFolder directory with the model's classes")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.set_defaults(handler=_cmd_eval)

    p = sub.add_parser("weights", help="manage pre-trained BiT weights")
    wsub = p.add_subparsers(dest="weights_command", required=True, metavar="ACTION")
    w = wsub.add_parser("pull", help="download official weights (resumable)")
    w.add_argument("name", help="official name, e.g. BiT-M-R50x1")
    w.add_argument("--quiet", action="store_true")
    w.set_defaults(handler=_cmd_weights_pull)
    w = wsub.add_parser("import", help="install a BiT .npz file, or a model bundle as a base")
    w.add_argument("file")
    w.add_argument("--name", help="name to install it under (default: the file name)")
    w.set_defaults(handler=_cmd_weights_import)
    w = wsub.add_parser("list", help="installed and downloadable weights")
    w.set_defaults(handler=_cmd_weights_list)
    for action in wsub.choices.values():
        action.add_argument("--weights-dir", help="weights directory (default $BIT_HOME/weights)")
    return parser, sub


# Errors a user can act on are printed as one line, without a traceback.
class CommandFailed(RuntimeError):
    """A step the command ran (e.g. the distributed run) failed; it said why already."""


USER_ERRORS: tuple[type[BaseException], ...] = (
    CommandFailed,
    ValueError,
    LookupError,
    FileNotFoundError,
    ImageDecodeError,
    CheckpointError,
    ExportUnavailable,
    weights.WeightsDownloadError,
    weights.WeightsIntegrityError,
)


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse and dispatch; user errors become `bit: error: ...` and exit code 2."""
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except USER_ERRORS as exc:
        print(f"bit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bit: interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    parser, _ = build_parser()
    return run(parser, argv)
