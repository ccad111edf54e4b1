"""``milan export``, ``milan convert`` and ``milan inspect``.

Examples::

    milan inspect runs/milan/checkpoints/last.pt
    milan export runs/milan/checkpoints/last.pt --to timm --out vitb16_milan.safetensors --pth
    milan export milan_vit-base-p16_in1k.pth --to hf --out vitb16_milan_hf/
    milan convert --from mmpretrain --to milan milan_vit-base-p16_in1k.pth milan_vitb16.pth
    milan convert --from openai-clip --to timm ViT-B-16.pt clip_vitb16_tower.safetensors
"""

from __future__ import annotations

import argparse
import sys

from milan.checkpoint.formats import FORMATS, read_checkpoint
from milan.checkpoint.io import CheckpointError


def _read_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("architecture facts the weights do not record (defaults: see milan.checkpoint)")
    g.add_argument("--num-heads", type=int, help="heads of the main network (student encoder, or the teacher)")
    g.add_argument("--decoder-num-heads", type=int, help="decoder heads (default width // 32)")
    g.add_argument("--teacher-num-heads", type=int, help="heads of a teacher stored inside a MILAN checkpoint")
    g.add_argument("--act", choices=("quick_gelu", "gelu", "gelu_tanh"), help="teacher MLP activation")
    g.add_argument("--norm-eps", type=float, help="teacher LayerNorm epsilon")
    g.add_argument("--img-size", type=int, help="run the teacher at this resolution (position table resampled)")
    g.add_argument("--model-name", help="timm model name of a timm / OpenCLIP visual.trunk teacher")


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Adds the arguments of ``export``, ``convert`` or ``inspect``."""
    formats = ("auto", *FORMATS)
    if command == "export":
        parser.add_argument("checkpoint", metavar="CKPT", help="any supported checkpoint file or folder")
        parser.add_argument("--to", choices=("timm", "hf"), default="timm", help="target library (default timm)")
        parser.add_argument("--out", required=True, help="output file (timm: .safetensors or .pth) or folder (hf)")
        parser.add_argument("--pth", action="store_true", help="timm: also write a .pth next to the .safetensors")
        parser.add_argument("--no-head", action="store_true", help="timm: fine-tuned classifier without head")
        parser.add_argument("--from", dest="fmt", choices=formats, default="auto", help="source format")
    elif command == "convert":
        parser.add_argument("--from", dest="fmt", choices=formats, default="auto", help="source format")
        parser.add_argument("--to", choices=("milan", "timm"), required=True, help="target layout")
        parser.add_argument("src", metavar="SRC", help="source checkpoint file or folder")
        parser.add_argument("dst", metavar="DST", help="output file (.safetensors, or .pth for a torch file)")
    elif command == "inspect":
        parser.add_argument("checkpoint", metavar="CKPT", help="any supported checkpoint file or folder")
        parser.add_argument("--from", dest="fmt", choices=formats, default="auto", help="source format")
        parser.add_argument("--groups", type=int, default=40, help="key groups to list (default 40)")
    else:
        raise ValueError(f"milan.checkpoint.cli does not serve {command!r}")
    _read_options(parser)


def run(args: argparse.Namespace) -> int:
    """Runs the command; returns the exit status (1 with a one-line message on a bad checkpoint)."""
    from milan.checkpoint.export import export_hf, export_timm, save_canonical
    from milan.checkpoint.report import describe

    options = {
        "num_heads": args.num_heads,
        "decoder_num_heads": args.decoder_num_heads,
        "teacher_num_heads": args.teacher_num_heads,
        "act": args.act,
        "norm_eps": args.norm_eps,
        "img_size": args.img_size,
        "model_name": args.model_name,
    }
    options = {k: v for k, v in options.items() if v is not None}
    try:
        if args.command == "inspect":
            print(describe(read_checkpoint(args.checkpoint, args.fmt, **options), max_groups=args.groups))
        elif args.command == "export":
            ck = read_checkpoint(args.checkpoint, args.fmt, **options)
            if args.to == "hf":
                result = export_hf(ck, args.out)
                print(f"wrote {args.out}/ (config.json, model.safetensors, preprocessor_config.json)")
                print(f"load: transformers.ViTModel.from_pretrained({args.out!r}, add_pooling_layer=False)")
            else:
                result = export_timm(ck, args.out, pth=args.pth, head=not args.no_head)
                for path in (result.path, *result.extra_paths):
                    print(f"wrote {path} ({result.kind})")
                for note in result.notes:
                    print(f"note: {note}")
                if result.snippet:
                    print(f"load: {result.snippet}")
        else:  # convert
            ck = read_checkpoint(args.src, args.fmt, **options)
            if args.to == "milan":
                print(f"wrote {save_canonical(ck, args.dst)} ({ck.format} {ck.kind} -> milan)")
            else:
                result = export_timm(ck, args.dst)
                print(f"wrote {result.path} ({ck.format} {ck.kind} -> timm)")
                for note in result.notes:
                    print(f"note: {note}")
                if result.snippet:
                    print(f"load: {result.snippet}")
    except (CheckpointError, ValueError, TypeError) as e:
        print(f"milan {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0
