"""Zero-shot prompt templates, defined once: the default ensemble for class names (CLI, demo,
class-folder validation) and the shapes data's caption templates (its zero-shot ensemble)."""

from __future__ import annotations

from collections.abc import Sequence

# The ensemble used when none is given: each class embedding is the mean over these.
DEFAULT_TEMPLATES = ("a {}", "a picture of a {}", "an image of a {}", "a drawing of a {}")


def check_templates(templates: Sequence[str], name: str = "templates") -> list[str]:
    """A non-empty list of strings that each contain ``{}``; an error names ``name`` otherwise."""
    templates = [templates] if isinstance(templates, str) else list(templates) if isinstance(templates, (list, tuple)) else []
    if not templates or not all(isinstance(t, str) and "{}" in t and _fills(t) for t in templates):
        raise ValueError(f"{name} must be a non-empty list of strings that each contain '{{}}' (and no other "
                         f"braces; write {{{{ }}}} for a literal brace), got {templates}")
    return templates


def _fills(template: str) -> bool:
    try:
        template.format("x")
    except (KeyError, IndexError, ValueError):
        return False
    return True


def class_prompts(classes: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES) -> list[list[str]]:
    """Per class, its prompt ensemble (``templates`` filled with the class name)."""
    templates = check_templates(templates)
    return [[t.format(name) for t in templates] for name in classes]
