"""The ``multimodal`` command. Training subcommands go to LightningCLI (imported lazily, so
the modeling packages never import Lightning); the others are plain argparse and use the
shipped shapes model (``assets/models/shapes``) when ``--model`` is omitted."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .config import MAX_IMAGES, SCHEDULER_NAMES  # standard library only: --help stays fast

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
base alone).
"""


def _model_dir(model: str | None) -> Path:
    from .demo import SHIPPED_MODEL

    directory = Path(model) if model else SHIPPED_MODEL
    if not directory.is_dir():
        hint = "" if model else " (the shipped model; pass --model DIR for another)"
        raise FileNotFoundError(f"--model: no model folder at {directory}{hint}")
    return directory


def _pipeline(args: argparse.Namespace, **kwargs):
    """The pipeline of ``--model`` (default: the shipped model), with ``--adapter`` on it; an
    adapter alone brings its recorded base model."""
    from .pipeline import FoundationPipeline

    adapter = getattr(args, "adapter", None)
    if adapter is not None:
        from .lora import is_adapter_folder

        if not is_adapter_folder(adapter):
            raise FileNotFoundError(f"--adapter: {adapter} is not an adapter folder (no adapter_config.json)")
    kwargs["allow_untrained"] = getattr(args, "allow_untrained", False)
    if adapter is not None and args.model is None:
        return FoundationPipeline.from_pretrained(adapter, **kwargs)
    return FoundationPipeline.from_pretrained(_model_dir(args.model), adapter=adapter, **kwargs)


def _export(args: argparse.Namespace) -> int:
    from train.module import FoundationModule

    import torch

    from train.cli import check_checkpoint_file

    from .folders import check_target

    check_checkpoint_file(args.ckpt, "--ckpt")
    check_target(args.out, args.overwrite, "--out", inputs=[args.ckpt])  # before any work
    import inspect

    try:
        ckpt = torch.load(args.ckpt, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - not a checkpoint, or one holding objects other than tensors
        raise ValueError(f"--ckpt: {args.ckpt} is not a Lightning checkpoint written by multimodal fit ({type(err).__name__})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"--ckpt: {args.ckpt} is not a Lightning checkpoint written by multimodal fit (no state_dict)")
    step = ckpt.get("global_step")
    # the run's model arguments (those this version still has: checkpoints of earlier versions
    # carried evaluation settings that now live in evaluators); init_from=None: the checkpoint
    # holds every weight, so the run's starting folder is not needed
    known = inspect.signature(FoundationModule.__init__).parameters
    hparams = {k: v for k, v in ckpt.get("hyper_parameters", {}).items() if k in known}
    module = FoundationModule(**{**hparams, "init_from": None})
    module.hparams["init_from"] = hparams.get("init_from")  # named in the training record
    module.on_load_checkpoint(ckpt)  # the decoder's EMA weights, what the starting point knew
    module.load_state_dict(ckpt["state_dict"])
    data = ckpt.get("datamodule_hyper_parameters") or {}
    model = module.model
    model.config.training, model.vocabulary = module.knowledge({"source": data.get("source"), "path": data.get("path")}, step)
    del ckpt
    from .card import model_card

    card = model_card(
        module.model.config, name=Path(args.out).name,
        training=(f"Exported from `{args.ckpt}` (global step {step}) with `multimodal export --ckpt {args.ckpt} "
                  f"--out {args.out}`; stage `{module.hparams.stage}`, preset `{module.hparams.preset}`; the decoder "
                  "weights are the EMA weights."),
    )
    dtype = {"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    if model.adapter is not None and not args.merge:  # a LoRA run: the adapter alone
        model.save_adapter(args.out, card=card, overwrite=args.overwrite)  # with the base (and its hash) recorded when training started
        print(f"wrote the LoRA adapter to {args.out} (base: {model.adapter.base_model}; --merge writes a full model instead)")
        return 0
    if model.adapter is not None:
        model.merge_adapter()
    with module.ema_weights():
        model.save_pretrained(args.out, model_card=card, dtype=dtype, overwrite=args.overwrite)
    print(f"wrote {args.out}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    import torch

    from .checks import check_image_path

    if not 1 <= args.num_images <= MAX_IMAGES:
        raise ValueError(f"--num-images must be in [1, {MAX_IMAGES}], got {args.num_images}")
    target = Path(args.out)
    paths = [target] if args.num_images == 1 else [target.with_name(f"{target.stem}_{i}{target.suffix}") for i in range(args.num_images)]
    for path in paths:  # before sampling: nothing is computed for an output that cannot be written
        check_image_path(path, args.overwrite, "--out")
    pipe = _pipeline(args, scheduler=args.scheduler, components=("decoder",))  # None: the model's recommended settings (config.sampling)
    out = pipe(
        args.prompt, negative_prompt=args.negative, num_inference_steps=args.steps, guidance_scale=args.guidance,
        num_images_per_prompt=args.num_images,
        generator=[torch.Generator().manual_seed(args.seed + i) for i in range(args.num_images)],
    )
    _warn_unseen(pipe, args.prompt)
    target.parent.mkdir(parents=True, exist_ok=True)
    for image, path in zip(out.images, paths):
        image.save(path)
        print(f"wrote {path}")
    return 0


def _caption(args: argparse.Namespace) -> int:
    import torch

    from .files import check_files

    check_files(args.images, "images")
    pipe = _pipeline(args, components=("language",))
    captions = pipe.caption(
        args.images, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, do_sample=args.sample,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator=torch.Generator().manual_seed(args.seed),
    )
    for image, caption in zip(args.images, captions):
        print(f"{image}\t{caption}" if len(args.images) > 1 else caption)
    return 0


def _classify(args: argparse.Namespace) -> int:
    from .files import check_files

    check_files(args.images, "images")
    if args.top < 1:
        raise ValueError(f"--top must be at least 1, got {args.top}")
    if (args.labels is None) == (args.support is None):
        raise ValueError("give --labels (zero-shot) or --support (few-shot from labeled examples), not both or neither")
    pipe = _pipeline(args, components=())  # the encoders alone
    if args.support is not None:  # few-shot: class prototypes from k examples per class
        from .adapt import labeled_folder

        paths, support_labels, labels = labeled_folder(args.support, what="--support", max_per_class=args.shots)
        scores = pipe.classify_few_shot(args.images, [str(p) for p in paths], support_labels)
        probs = (pipe.model.encoders.logit_scale.exp().float().cpu() * scores).softmax(-1)
    else:
        import warnings

        from .knowledge import UnseenWordsWarning
        from .templates import DEFAULT_TEMPLATES

        labels = [label.strip() for label in args.labels.split(",") if label.strip()]
        if len(labels) < 2:
            raise ValueError(f"--labels: give at least two comma-separated labels, got {args.labels!r}")
        templates = args.templates or DEFAULT_TEMPLATES
        with warnings.catch_warnings():  # said once, below, in the CLI's words
            warnings.simplefilter("ignore", UnseenWordsWarning)
            probs = pipe.classify(args.images, labels, templates=templates)
        _warn_unseen(pipe, [t.format(label) for t in templates for label in labels])
    for image, row in zip(args.images, probs):
        best = sorted(zip(labels, row.tolist()), key=lambda x: -x[1])[: args.top]
        print(f"{image}\t" + "\t".join(f"{label} {p:.3f}" for label, p in best))
    return 0


def _complete(args: argparse.Namespace) -> int:
    from .files import check_files

    check_files([args.image] if args.image is not None else [], "--image")
    pipe = _pipeline(args, components=("language",))
    images = [args.image] if args.image is not None else None
    print(pipe.complete([args.text], images=images, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams)[0])
    _warn_unseen(pipe, args.text)
    return 0


def _probe(args: argparse.Namespace) -> int:
    from .adapt import labeled_folder, probe
    from .templates import DEFAULT_TEMPLATES

    paths, labels, classes = labeled_folder(args.data)
    templates = args.templates or DEFAULT_TEMPLATES
    pipe = _pipeline(args, components=())
    print(probe(pipe, [str(p) for p in paths], labels, classes, templates, args.test_fraction, args.shots, args.seed))
    return 0


def _merge(args: argparse.Namespace) -> int:
    import torch

    from .card import lora_summary
    from .files import read_regular
    from .folders import check_target

    out = check_target(args.out, args.overwrite, "--out", inputs=[x for x in (args.adapter, args.model) if x])  # before loading
    pipe = _pipeline(args)
    adapter = pipe.model.adapter
    base = adapter.base_model if args.model is None else args.model
    pipe.merge_adapter()
    card = None
    source_card = Path(args.adapter) / "README.md"
    if source_card.is_file():  # keep what the adapter's card says (data, metrics), and say it is merged now
        card = read_regular(source_card, 1 << 20).decode("utf-8", errors="replace") + (f"\n\n## Merged\n\nThis folder is the adapter `{args.adapter}` merged into "
                                          f"`{base}` with `multimodal merge`: a full model.{lora_summary(adapter, base)}")
    dtype = {"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    if adapter.base_model and Path(adapter.base_model).exists() and out.exists() and os.path.samefile(adapter.base_model, out):
        raise ValueError(f"--out is the adapter's base model {adapter.base_model}: write the merged model to a new folder")
    pipe.model.save_pretrained(args.out, model_card=card, dtype=dtype, overwrite=args.overwrite)
    print(f"wrote {args.out} (the adapter merged into {base})")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from train.evaluate import run_evaluate

    run_evaluate(str(_model_dir(args.model)), args.data, args.out, args.train_data, args.inception_weights,
                 args.limit, args.overwrite)
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from .datasets import write_digits

    counts = write_digits(args.out, overwrite=args.overwrite)
    print(f"wrote {args.out}/train ({counts['train']} images) and {args.out}/val ({counts['val']} images) with "
          "metadata.jsonl captions made from the labels; train all heads with\n"
          f"  multimodal fit --config assets/configs/folder.yaml --data.path {args.out}/train --data.val_path {args.out}/val")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import launch

    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port must be in [1, 65535], got {args.port}")

    if args.adapter is not None and args.model is None:  # the adapter on the base it records
        launch(args.adapter, host=args.host, port=args.port, allow_untrained=args.allow_untrained)
    else:
        launch(_model_dir(args.model), host=args.host, port=args.port, adapter=args.adapter, allow_untrained=args.allow_untrained)
    return 0


def _model_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--model", default=None, help="a save_pretrained folder (default: the shipped shapes model)")
    command.add_argument("--adapter", default=None, help="a LoRA adapter folder to apply (alone: on the base it records)")
    command.add_argument("--allow-untrained", action="store_true",
                         help="run components this model never trained (refused otherwise: their output is noise)")


def _warn_unseen(pipe, texts) -> None:
    """Tell the user which words of their input the model never saw in training."""
    from .knowledge import unseen_message

    if words := pipe.unseen_words(texts):
        print(f"warning: {unseen_message(words)}", file=sys.stderr)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multimodal")
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="Lightning checkpoint -> save_pretrained folder")
    exp.add_argument("--ckpt", required=True, help="a .ckpt written by multimodal fit")
    exp.add_argument("--out", required=True, help="output folder")
    exp.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                     help="store the weights in this type (float16: half the size)")
    exp.add_argument("--merge", action="store_true", help="LoRA runs: write the adapter merged into a full model")
    exp.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder as a whole (everything in it goes)")
    mrg = sub.add_parser("merge", help="LoRA adapter + its base -> a merged full model")
    mrg.add_argument("--adapter", required=True, help="an adapter folder (written by a fit with --model.lora)")
    mrg.add_argument("--model", default=None, help="the base model folder (default: the one the adapter records)")
    mrg.add_argument("--out", required=True, help="output folder")
    mrg.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    mrg.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder as a whole (everything in it goes)")
    gen = sub.add_parser("generate", help="text -> image(s)")
    gen.add_argument("prompt")
    _model_options(gen)
    gen.add_argument("--out", default="image.png", help="output PNG (several images: NAME_0.png, NAME_1.png, ...; default image.png)")
    gen.add_argument("--negative", default=None, help="negative prompt (default: the empty prompt)")
    gen.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's recommended, config.json 'sampling')")
    gen.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the model's recommended)")
    gen.add_argument("--seed", type=int, default=0, help="image i uses seed + i (default 0)")
    gen.add_argument("--scheduler", default=None, choices=SCHEDULER_NAMES,
                     help="sampling scheduler (default: the model's recommended)")
    gen.add_argument("--num-images", type=int, default=1, help=f"images to generate, 1..{MAX_IMAGES} (default 1)")
    gen.add_argument("--overwrite", action="store_true", help="replace existing output images")
    cap = sub.add_parser("caption", help="image(s) -> caption(s)")
    cap.add_argument("images", nargs="+", help="image file(s)")
    _model_options(cap)
    cap.add_argument("--max-new-tokens", type=int, default=16)
    cap.add_argument("--num-beams", type=int, default=1)
    cap.add_argument("--sample", action="store_true", help="sample instead of greedy / beam search")
    cap.add_argument("--temperature", type=float, default=1.0)
    cap.add_argument("--top-k", type=int, default=None)
    cap.add_argument("--top-p", type=float, default=1.0)
    cap.add_argument("--seed", type=int, default=0)
    cls = sub.add_parser("classify", help="image(s) + labels -> probabilities")
    cls.add_argument("images", nargs="+", help="image file(s)")
    cls.add_argument("--labels", default=None, help="zero-shot: comma-separated class names, e.g. 'red circle, blue square'")
    cls.add_argument("--support", default=None, help="few-shot instead: a folder with one subfolder of example images per class")
    cls.add_argument("--shots", type=int, default=None, help="with --support: use at most this many examples per class")
    cls.add_argument("--templates", nargs="*", default=None, help="prompt templates with {} (default: the shapes caption templates)")
    cls.add_argument("--top", type=int, default=3, help="how many labels to print per image")
    _model_options(cls)
    com = sub.add_parser("complete", help="text -> text")
    com.add_argument("text")
    com.add_argument("--image", default=None, help="complete the text about this image")
    com.add_argument("--max-new-tokens", type=int, default=16)
    com.add_argument("--num-beams", type=int, default=1)
    _model_options(com)
    prb = sub.add_parser("probe", help="linear probe / zero-shot / few-shot accuracy on a labeled folder")
    prb.add_argument("--data", required=True, help="a folder with one subfolder of images per class (name: the class)")
    _model_options(prb)
    prb.add_argument("--templates", nargs="*", default=None, help="zero-shot prompt templates with {}")
    prb.add_argument("--test-fraction", type=float, default=0.5, help="share of each class held out for testing")
    prb.add_argument("--shots", type=int, default=5, help="examples per class for the prototypes")
    prb.add_argument("--seed", type=int, default=0)
    ev = sub.add_parser("evaluate", help="a model on an image-caption folder -> report.json, report.md, PNGs")
    ev.add_argument("--model", default=None, help="a save_pretrained folder (default: the shipped shapes model)")
    ev.add_argument("--data", required=True, help="the evaluation folder (images + captions; class subfolders give zero-shot and class scores)")
    ev.add_argument("--out", default="report", help="output folder (default report/; never overwritten without --overwrite)")
    ev.add_argument("--train-data", default=None, help="the training folder, for the pixel classifier (default: the one the model's record names)")
    ev.add_argument("--inception-weights", default=None, help="a local Inception-v3 FID weights file: FID/KID on Inception features too")
    ev.add_argument("--limit", type=int, default=None, help="caption and generate for at most this many images (default: all; retrieval and zero-shot use all)")
    ev.add_argument("--overwrite", action="store_true", help="replace an existing report folder")
    pre = sub.add_parser("prepare", help="write a data set a package ships as image folders")
    pre.add_argument("dataset", choices=("digits",), help="digits: scikit-learn's handwritten digits (1797 scans, CC BY 4.0)")
    pre.add_argument("out", help="output folder (gets train/ and val/)")
    pre.add_argument("--overwrite", action="store_true", help="replace a non-empty folder as a whole (everything in it goes)")
    dem = sub.add_parser("demo", help="the Gradio demo page")
    _model_options(dem)
    dem.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    dem.add_argument("--port", type=int, default=7860)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    try:
        if argv[0] in TRAIN_COMMANDS:
            from train.cli import run_cli

            run_cli(argv)
            return 0
        commands = {
            "export": _export, "merge": _merge, "generate": _generate, "caption": _caption, "classify": _classify,
            "complete": _complete, "demo": _demo, "probe": _probe, "evaluate": _evaluate, "prepare": _prepare,
        }
        if argv[0] not in commands:
            print(f"multimodal: unknown command {argv[0]!r}\n\n{USAGE}", file=sys.stderr)
            return 2
        args = _parser().parse_args(argv)
        return commands[args.command](args)
    except (ValueError, OSError, FloatingPointError, ImportError) as err:
        print(f"multimodal {argv[0]}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
