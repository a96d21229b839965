"""The method registry: which continual-learning methods a run can name, how names are spelled, and their options.

A method is a :class:`~treelora.cl.method.ContinualMethod` subclass; :func:`register_method` makes it available to
:class:`~treelora.cl.Trainer` and ``treelora run --methods`` under its ``name`` (and its ``label``, in any case, with
or without hyphens: ``O-LoRA``, ``olora`` and ``OLoRA`` are the same method). Adding a method is one registration::

    @register_method
    class MyMethod(SeqLoRA):
        name, label = "mymethod", "MyMethod"
        ...

The built-in methods are registered at the end of this module, in the order in which listings show them.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence, TypeVar

from treelora.cl.baselines import EWC, ExperienceReplay, InfLoRA, JointTraining, LwF, OLoRA, SeqLoRA
from treelora.cl.method import ContinualMethod
from treelora.cl.treelora import TreeLoRA

M = TypeVar("M", bound=type[ContinualMethod])

_METHODS: dict[str, type[ContinualMethod]] = {}


def _normalize(name: str) -> str:
    return name.strip().lower().replace("-", "").replace("_", "")


def register_method(method: M, *, replace: bool = False) -> M:
    """Make ``method`` (a ContinualMethod subclass with ``name`` and ``label``) available under its name; returns it,
    so that it also works as a class decorator.

    Raises:
        TypeError: ``method`` is not a ContinualMethod subclass, or lacks ``name`` / ``label``.
        ValueError: its name or label is already taken by another method (unless ``replace``).
    """
    if not (isinstance(method, type) and issubclass(method, ContinualMethod)):
        raise TypeError(f"method must be a ContinualMethod subclass, got {method!r}")
    name, label = getattr(method, "name", None), getattr(method, "label", None)
    if not isinstance(name, str) or not isinstance(label, str) or not name or not label:
        raise TypeError(f"{method.__name__} must set the class attributes name and label (non-empty strings)")
    if _normalize(name) != name:
        raise ValueError(f"{method.__name__}.name must be lower case without '-' or '_', got {name!r}")
    if not replace:
        for other in _METHODS.values():
            if other is not method and {name, _normalize(label)} & {other.name, _normalize(other.label)}:
                raise ValueError(f"method name {name!r} / label {label!r} is taken by {other.__name__}")
    _METHODS[name] = method
    return method


def registered_methods() -> list[str]:
    """The registered method names, in registration order."""
    return list(_METHODS)


def canonical_method(name: str) -> str:
    """The registry name of a method given by name or label in any case, with or without hyphens or underscores
    (``O-LoRA`` -> ``olora``).

    Raises:
        TypeError: ``name`` is not a string. ValueError: no registered method has that name.
    """
    if not isinstance(name, str):
        raise TypeError(f"method name must be a string, got {name!r}")
    key = _normalize(name)
    for method in _METHODS.values():
        if key in (method.name, _normalize(method.label)):
            return method.name
    raise ValueError(f"unknown method {name!r}: choose from {', '.join(m.label for m in _METHODS.values())}")


def method_class(name: str) -> type[ContinualMethod]:
    """The registered class of a method name or label (see :func:`canonical_method`)."""
    return _METHODS[canonical_method(name)]


def method_label(name: str) -> str:
    """How tables name a method: its label when registered (``olora`` -> ``O-LoRA``), else ``name`` unchanged (a
    method built from a callable)."""
    method = _METHODS.get(name)
    return method.label if method is not None else name


class MethodOptionError(ValueError):
    """A method option that no method of the run accepts; the message names the option and the methods."""


def assign_method_options(methods: Sequence[str], options: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Give each method of a run the options it accepts, after checking every option's name and value.

    Builds nothing (no model, no layers), so that a bad option fails before a model is loaded.

    Args:
        methods: registered method names (or labels) of the run.
        options: option name -> value, for whichever methods accept them.
    Returns:
        method name -> its options (an empty dict for a method that accepts none of them).
    Raises:
        MethodOptionError: an option that none of ``methods`` accepts (the message lists which registered methods do,
            if any).
        TypeError, ValueError: a value of the wrong type / out of range (raised by the method's check_options).
    """
    classes = {canonical_method(m): method_class(m) for m in methods}
    for option in options:
        if not any(option in cls.option_help for cls in classes.values()):
            labels = " or ".join(cls.label for cls in classes.values())
            owners = [m.label for m in _METHODS.values() if option in m.option_help]
            where = f"an option of {', '.join(owners)}" if owners else "not an option of any method"
            raise MethodOptionError(f"method option {option!r} does not apply to {labels} (it is {where})")
    assigned = {}
    for name, cls in classes.items():
        own = {k: v for k, v in options.items() if k in cls.option_help}
        cls.check_options(own)
        assigned[name] = own
    return assigned


register_method(TreeLoRA)
register_method(SeqLoRA)
register_method(OLoRA)
register_method(EWC)
register_method(JointTraining)
register_method(LwF)
register_method(ExperienceReplay)
register_method(InfLoRA)
