"""The ``multimodal`` command's options (standard library only: ``--help`` answers at once).
Every option says what it does, its default and, where there are few, its choices."""

from __future__ import annotations

import argparse

from .config import GenerationArgs, MAX_BEAMS, MAX_IMAGES, SCHEDULER_NAMES

TRAIN_COMMANDS = ("fit", "validate", "test", "predict")
USAGE = """usage: multimodal {fit,validate,test,predict,evaluate,prepare,export,merge,generate,classify,caption,complete,demo,probe} ...

  fit        train (LightningCLI: --config assets/configs/align.yaml; --print_config shows every option)
  validate   evaluate a checkpoint on the validation split (--ckpt_path)
  test       same metrics on the held-out split (--ckpt_path)
  predict    run prediction (--ckpt_path)
  evaluate   a model on any image-caption folder: retrieval, zero-shot, caption BLEU/CIDEr/ROUGE, FID/KID -> report/
  prepare    write a real data set a package ships (digits: scikit-learn's handwritten digits) as train/ and val/ folders
  export     Lightning checkpoint -> save_pretrained folder (decoder/ also in diffusers' format; LoRA runs: the adapter)
  merge      LoRA adapter + its base model -> a merged full model
  generate   text -> image(s)
  classify   image(s) + labels -> zero-shot probabilities (--support FOLDER: few-shot from examples)
  caption    image(s) -> caption(s) (greedy, --num-beams, --sample)
  complete   text -> text (optionally about an image: --image)
  demo       the Gradio demo page (127.0.0.1:7860 by default)
  probe      linear probe vs zero-shot vs k-shot prototypes on a labeled image folder

generate, classify, caption, complete, demo and probe take --model DIR (a save_pretrained folder);
without it they use the shipped shapes model. --adapter DIR puts a LoRA adapter on it (leave it out: the
base alone). --device picks where they run (default auto: the GPU when there is one).
`multimodal COMMAND --help` lists a command's options with their defaults.
"""
DTYPES = ("float32", "float16", "bfloat16")


class _Help(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an option's help unless it says its default itself (a None
    default means something the help explains; a flag is off unless given)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS  # (0 == False)
        if action.option_strings and not unset and "default" not in text:
            text += " (default: %(default)s)"
        return text


def _model_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--model", default=None, help="a save_pretrained folder (default: the shipped shapes model)")
    command.add_argument("--adapter", default=None, help="a LoRA adapter folder to apply (alone: on the base it records; default: none)")
    command.add_argument("--allow-untrained", action="store_true",
                         help="run components this model never trained (refused otherwise: their output is noise)")
    command.add_argument("--device", default="auto", help="where the model runs: auto (CUDA when present, else the CPU), cpu, cuda, cuda:N")


def _sub(sub, name: str, text: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=text, description=text, formatter_class=_Help)


def _overwrite(command: argparse.ArgumentParser, what: str) -> None:
    command.add_argument("--overwrite", action="store_true", help=f"replace {what} (never done without this flag)")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="multimodal")
    sub = top.add_subparsers(dest="command", required=True)
    gen_defaults = GenerationArgs()
    exp = _sub(sub, "export", "Lightning checkpoint -> save_pretrained folder")
    exp.add_argument("--ckpt", required=True, help="a .ckpt written by multimodal fit (required)")
    exp.add_argument("--out", required=True, help="output folder (required)")
    exp.add_argument("--dtype", default="float32", choices=DTYPES, help="store the weights in this type (float16: half the size)")
    exp.add_argument("--merge", action="store_true", help="LoRA runs: write the adapter merged into a full model")
    _overwrite(exp, "a non-empty --out folder as a whole (everything in it goes)")
    mrg = _sub(sub, "merge", "LoRA adapter + its base -> a merged full model")
    mrg.add_argument("--adapter", required=True, help="an adapter folder, written by a fit with --model.lora (required)")
    mrg.add_argument("--model", default=None, help="the base model folder (default: the one the adapter records)")
    mrg.add_argument("--out", required=True, help="output folder (required)")
    mrg.add_argument("--dtype", default="float32", choices=DTYPES, help="store the weights in this type")
    _overwrite(mrg, "a non-empty --out folder as a whole (everything in it goes)")
    gen = _sub(sub, "generate", "text -> image(s)")
    gen.add_argument("prompt", help="what to draw, e.g. 'a large red circle'")
    _model_options(gen)
    gen.add_argument("--out", default="image.png", help="output PNG (several images: NAME_0.png, NAME_1.png, ...)")
    gen.add_argument("--negative", default=None, help="negative prompt (default: the empty prompt)")
    gen.add_argument("--steps", type=int, default=None, help="sampling steps, >= 1 (default: the model's recommended, config.json 'sampling')")
    gen.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale, >= 0 (default: the model's recommended)")
    gen.add_argument("--seed", type=int, default=0, help="image i uses seed + i; 0..2147483647")
    gen.add_argument("--scheduler", default=None, choices=SCHEDULER_NAMES, help="sampling scheduler (default: the model's recommended)")
    gen.add_argument("--num-images", type=int, default=1, help=f"images to generate, 1..{MAX_IMAGES}")
    _overwrite(gen, "existing output images")
    cap = _sub(sub, "caption", "image(s) -> caption(s)")
    cap.add_argument("images", nargs="+", help="image file(s)")
    _model_options(cap)
    _generation_options(cap, gen_defaults)
    cap.add_argument("--sample", action="store_true", help="sample (--temperature, --top-k, --top-p) instead of greedy / beam search")
    cap.add_argument("--temperature", type=float, default=gen_defaults.temperature, help="with --sample: softmax temperature, > 0")
    cap.add_argument("--top-k", type=int, default=None, help="with --sample: keep the k most likely tokens (default: all)")
    cap.add_argument("--top-p", type=float, default=gen_defaults.top_p, help="with --sample: nucleus mass, in (0, 1]")
    cap.add_argument("--seed", type=int, default=0, help="with --sample: the random seed, 0..2147483647")
    cls = _sub(sub, "classify", "image(s) + labels -> probabilities")
    cls.add_argument("images", nargs="+", help="image file(s)")
    cls.add_argument("--labels", default=None, help="zero-shot: comma-separated class names, e.g. 'red circle, blue square' (default: none; this or --support)")
    cls.add_argument("--support", default=None, help="few-shot instead: a folder with one subfolder of example images per class (default: none)")
    cls.add_argument("--shots", type=int, default=None, help="with --support: use at most this many examples per class (default: all)")
    cls.add_argument("--templates", nargs="*", default=None, help="prompt templates with {} (default: the shapes caption templates)")
    cls.add_argument("--top", type=int, default=3, help="how many labels to print per image, >= 1")
    _model_options(cls)
    com = _sub(sub, "complete", "text -> text")
    com.add_argument("text", help="the start of a text, e.g. 'a picture of a'")
    com.add_argument("--image", default=None, help="complete the text about this image (default: text only)")
    _generation_options(com, gen_defaults)
    _model_options(com)
    prb = _sub(sub, "probe", "linear probe / zero-shot / few-shot accuracy on a labeled folder")
    prb.add_argument("--data", required=True, help="a folder with one subfolder of images per class, named by the class (required)")
    _model_options(prb)
    prb.add_argument("--templates", nargs="*", default=None, help="zero-shot prompt templates with {} (default: the shapes caption templates)")
    prb.add_argument("--test-fraction", type=float, default=0.5, help="share of each class held out for testing, in (0, 1)")
    prb.add_argument("--shots", type=int, default=5, help="examples per class for the prototypes, >= 1")
    prb.add_argument("--seed", type=int, default=0, help="the random split's seed")
    ev = _sub(sub, "evaluate", "a model on an image-caption folder -> report.json, report.md, PNGs")
    ev.add_argument("--model", default=None, help="a save_pretrained folder (default: the shipped shapes model)")
    ev.add_argument("--data", required=True, help="the evaluation folder: images + captions; class subfolders give zero-shot and class scores (required)")
    ev.add_argument("--out", default="report", help="output folder")
    ev.add_argument("--train-data", default=None, help="the training folder, for the pixel classifier (default: the one the model's record names)")
    ev.add_argument("--inception-weights", default=None, help="a local Inception-v3 FID weights file: FID/KID on Inception features too (default: none)")
    ev.add_argument("--limit", type=int, default=None, help="caption and generate for at most this many images (default: all; retrieval and zero-shot use all)")
    _overwrite(ev, "an existing report folder")
    pre = _sub(sub, "prepare", "write a data set a package ships as image folders")
    pre.add_argument("dataset", choices=("digits",), help="digits: scikit-learn's handwritten digits (1797 scans, CC BY 4.0)")
    pre.add_argument("out", help="output folder (gets train/ and val/)")
    _overwrite(pre, "a non-empty folder as a whole (everything in it goes)")
    dem = _sub(sub, "demo", "the Gradio demo page")
    _model_options(dem)
    dem.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1: this machine only)")
    dem.add_argument("--port", type=int, default=7860, help="port, 1..65535")
    return top


def _generation_options(command: argparse.ArgumentParser, defaults: GenerationArgs) -> None:
    command.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens, help="at most this many new tokens, >= 1")
    command.add_argument("--num-beams", type=int, default=defaults.num_beams, help=f"beam search with this many beams, 1..{MAX_BEAMS} (1: greedy)")
