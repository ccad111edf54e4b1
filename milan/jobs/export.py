"""``milan export``, ``milan convert`` and ``milan inspect``.

Examples::

    milan inspect runs/milan/checkpoints/last.pt
    milan export runs/milan/checkpoints/last.pt --to timm --out vitb16_milan.safetensors --pth
    milan export runs/finetune/classifier.pt --out exports/vitb16_ft.safetensors   # with its head and class names
    milan export milan_vit-base-p16_in1k.pth --to hf --out vitb16_milan_hf/
    milan convert --from mmpretrain --to milan milan_vit-base-p16_in1k.pth milan_vitb16.pth
    milan convert --from openai-clip --to timm ViT-B-16.pt clip_vitb16_tower.safetensors
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from milan.checkpoint.export import Exported, describe, export_hf, export_timm, save_canonical
from milan.checkpoint.formats import FORMATS, read_checkpoint, resolve_spec
from milan.errors import CheckpointError
from milan.jobs.launch import add_view_arguments, print_warnings, view_options

COMMANDS = {
    "export": "export the encoder for timm / Hugging Face",
    "convert": "convert checkpoints between formats",
    "inspect": "print a checkpoint's format, architecture and keys",
}


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    metavar = "SRC" if command == "convert" else "CKPT"
    parser.add_argument("checkpoint", metavar=metavar, help="any supported checkpoint file or folder")
    parser.add_argument("--from", dest="fmt", choices=("auto", *FORMATS), default="auto", help="source format")
    if command == "export":
        parser.add_argument("--to", choices=("timm", "hf"), default="timm", help="target library (default timm)")
        parser.add_argument(
            "--out",
            required=True,
            help="output file (timm: .safetensors or .pth) or folder (hf); missing folders are created",
        )
        parser.add_argument("--pth", action="store_true", help="timm: also write a .pth next to the .safetensors")
        parser.add_argument("--no-head", action="store_true", help="timm: a classifier's pooled features, no head")
    elif command == "convert":
        parser.add_argument("--to", choices=("milan", "timm"), required=True, help="target layout")
        parser.add_argument("dst", metavar="DST", help="output file (.safetensors, or .pth for a torch file)")
    else:  # inspect
        parser.add_argument("--groups", type=int, default=40, help="key groups to list (default 40)")
    g = parser.add_argument_group("architecture facts the weights do not record (defaults: see milan.checkpoint)")
    g.add_argument("--num-heads", type=int, help="heads of the main network (student encoder, or the teacher)")
    g.add_argument("--decoder-num-heads", type=int, help="decoder heads (default width // 32)")
    g.add_argument("--teacher-num-heads", type=int, help="heads of a teacher stored inside a MILAN checkpoint")
    g.add_argument("--act", choices=("quick_gelu", "gelu", "gelu_tanh"), help="teacher MLP activation")
    g.add_argument("--norm-eps", type=float, help="teacher LayerNorm epsilon")
    g.add_argument("--img-size", type=int, help="run the teacher at this resolution (position table resampled)")
    g.add_argument("--model-name", help="timm model name of a timm / OpenCLIP visual.trunk teacher")
    add_view_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Runs the command; what a file does not record and had to be assumed is a warning naming the flag that sets it."""
    names = ("num_heads", "decoder_num_heads", "teacher_num_heads", "act", "norm_eps", "img_size", "model_name")
    options = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    view = view_options(args)
    ck = read_checkpoint(args.checkpoint, args.fmt, **options)
    if args.command == "inspect":
        print(describe(ck, max_groups=args.groups, resolved=resolve_spec(ck, **view) if ck.kind != "teacher" else None))
    elif args.command == "export":
        _output_folder(Path(args.out) if args.to == "hf" else Path(args.out).parent)
        if args.to == "hf":
            result = export_hf(ck, args.out)
            print_warnings(args.command, *result.assumed)
            print(f"wrote {args.out}/ (config.json, model.safetensors, preprocessor_config.json)")
            print(f"load: transformers.ViTModel.from_pretrained({args.out!r}, add_pooling_layer=False)")
        else:
            _report(export_timm(ck, args.out, pth=args.pth, head=not args.no_head, **view), args.command)
    else:  # convert
        _output_folder(Path(args.dst).parent)
        if ck.kind != "teacher":  # heads assumed now are written down as facts
            print_warnings(args.command, *(v for k, v in resolve_spec(ck).assumed.items() if k != "preprocessing"))
        if args.to == "milan":
            print(f"wrote {save_canonical(ck, args.dst)} ({ck.format} {ck.kind} -> milan)")
        else:
            _report(export_timm(ck, args.dst, **view), args.command)
    return 0


def _report(result: Exported, command: str) -> None:
    """What an export wrote, its notes, and the lines that load it."""
    print_warnings(command, *result.assumed)
    for path in (result.path, *result.extra_paths):
        print(f"wrote {path} ({result.kind})")
    for note in result.notes:
        print(f"note: {note}")
    for i, line in enumerate(result.snippet().splitlines()):
        print(f"{'load: ' if i == 0 else '      '}{line}")


def _output_folder(folder: Path) -> None:
    """Creates the output folder if missing; raises a one-line :class:`CheckpointError` if it cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create the output folder {folder}: {e.strerror or e}") from e
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CheckpointError(f"the output folder {folder} is not writable")
