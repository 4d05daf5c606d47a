"""The ``multimodal`` command. Training subcommands go to LightningCLI (imported lazily, so
the modeling packages never import Lightning); the others are plain argparse and use the
shipped shapes model (``assets/models/shapes``) when ``--model`` is omitted."""

from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from pathlib import Path

from .cli_parser import TRAIN_COMMANDS, USAGE, parser as _parser  # standard library only: --help stays fast
from .config import MAX_IMAGES

MAX_SEED = 2**31 - 1  # the demo's range too



def _model_dir(model: str | None) -> Path:
    from .demo import SHIPPED_MODEL

    directory = Path(model) if model else SHIPPED_MODEL
    if not directory.is_dir():
        hint = "" if model else " (the shipped model; pass --model DIR for another)"
        raise FileNotFoundError(f"--model: no model folder at {directory}{hint}")
    from .files import ADAPTER_CONFIG, CONFIG_NAME, PICKLE_SUFFIXES, WEIGHTS_NAME

    known = (CONFIG_NAME, WEIGHTS_NAME, ADAPTER_CONFIG)  # an adapter folder brings its base; pickles: the loader says why not
    if not any((directory / name).is_file() for name in known) and not any(p.suffix in PICKLE_SUFFIXES for p in directory.iterdir()):
        raise FileNotFoundError(f"--model: {directory} is not a model folder (no config.json or model.safetensors: a save_pretrained / export folder)")
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
    if getattr(args, "device", None) is not None:
        kwargs["device"] = _device(args.device)
    if adapter is not None and args.model is None:
        return FoundationPipeline.from_pretrained(adapter, **kwargs)
    return FoundationPipeline.from_pretrained(_model_dir(args.model), adapter=adapter, **kwargs)


def _device(name: str) -> str:
    """``--device``: auto is CUDA when present, else the CPU; a named device must exist here."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"--device {name}: no such CUDA device here ({torch.cuda.device_count()} visible); use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    return str(device)


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
    _check_seed(args.seed)
    target = Path(args.out)
    paths = [target] if args.num_images == 1 else [target.with_name(f"{target.stem}_{i}{target.suffix}") for i in range(args.num_images)]
    for path in paths:  # before sampling: nothing is computed for an output that cannot be written
        check_image_path(path, args.overwrite, "--out")
    pipe = _pipeline(args, scheduler=args.scheduler, components=("decoder",))  # None: the model's recommended settings (config.sampling)
    with warnings.catch_warnings():  # the command takes no filter: a warning about one is nothing a user can act on here
        warnings.filterwarnings("ignore", message="generating without a prompt filter")
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


def _check_seed(seed: int) -> None:
    """Seeds as the demo takes them: torch would wrap negative and huge ones, or overflow."""
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"--seed must be in [0, {MAX_SEED}], got {seed}")


def _caption(args: argparse.Namespace) -> int:
    import torch

    _check_seed(args.seed)
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
        launch(args.adapter, host=args.host, port=args.port, allow_untrained=args.allow_untrained, device=_device(args.device))
    else:
        launch(_model_dir(args.model), host=args.host, port=args.port, adapter=args.adapter, allow_untrained=args.allow_untrained,
               device=_device(args.device))
    return 0


def _warn_unseen(pipe, texts) -> None:
    """Tell the user which words of their input the model never saw in training."""
    from .knowledge import unseen_message

    if words := pipe.unseen_words(texts):
        print(f"warning: {unseen_message(words)}", file=sys.stderr)


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
        message = str(err) if argv[0] in TRAIN_COMMANDS else _as_options(str(err))
        print(f"multimodal {argv[0]}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before training starts (building the model, timing the precision): one line
        print(f"multimodal {argv[0]}: interrupted", file=sys.stderr)
        return 130


# the Python API's argument names in its errors -> the options that set them on the command line
OPTION_NAMES = {"num_inference_steps": "--steps", "guidance_scale": "--guidance", "num_images_per_prompt": "--num-images",
                "negative_prompt": "--negative", "num_beams": "--num-beams", "max_new_tokens": "--max-new-tokens",
                "min_new_tokens": "--min-new-tokens", "temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p"}


def _as_options(message: str) -> str:
    """An error of the pipeline, in the command line's words (``num_beams`` -> ``--num-beams``)."""
    return re.sub(r"(?<![\w-])(" + "|".join(OPTION_NAMES) + r")(?![\w-])", lambda m: OPTION_NAMES[m.group(1)], message)


if __name__ == "__main__":
    sys.exit(main())
