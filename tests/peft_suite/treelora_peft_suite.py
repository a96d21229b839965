"""pytest plugin for the PEFT-suite lane: PEFT's own LoRA tests, run with ``treelora.peft.register()`` in effect.

``scripts/peft_suite.py`` unpacks the tests of the installed PEFT version's source distribution into a cache folder
(as the package ``tests``, the name PEFT's tests expect to have) and runs pytest on them with this folder on the path
and ``-p treelora_peft_suite`` (a top-level module, so that this project's own ``tests`` package stays out of the
way). This plugin

* registers treelora for every LoRA config before any test runs, and fails the session if no test built a treelora
  layer or took the fused path (a lane that silently tested stock PEFT would prove nothing);
* keeps the selection below and deselects everything else PEFT's files collect;
* turns a failure to reach the model hub into a skip ("needs the network"): the lane runs offline
  (``HF_HUB_OFFLINE=1``); GPU tests skip through PEFT's own ``require_*`` decorators;
* stands in for ``diffusers`` and ``datasets`` when they are not installed: PEFT's shared test modules import one
  name from each at module level; the selected tests never use them (a stand-in raises if one does).

How the selection was chosen. treelora changes one thing in PEFT: the layer built for a plain ``nn.Linear`` target of
a ``LoraConfig``. So the lane takes the tests that build such layers on small models defined in the test files (no
downloads) and exercise what a LoRA layer must keep doing: forward in every dtype and under autocast, training,
merge / unmerge / safe merge, adapter add / switch / delete / disable, multiple active adapters, mixed adapter batches,
save / load (safetensors, pickle, low_cpu_mem_usage, direct injection), device_map, requires_grad bookkeeping, the
layer's repr and status, custom-module dispatch, hotswapping (also under ``torch.compile``), LoRA initialisation,
variants (DoRA, aLoRA, ..., which must fall back to PEFT's forward) and the low-level injection API:

* ``test_custom_models.py``: ``TestPeftCustomModel`` (all its test methods) on the cases of
  :data:`CUSTOM_MODEL_CASES` and its unparametrised LoRA tests; the LoRA cases of ``TestMultiRankAdapter``,
  ``TestLayerRepr``, ``TestMultipleActiveAdapters``, ``TestRequiresGrad``, ``TestMixedAdapterBatches``,
  ``TestDynamicDispatch``. Not taken: the other tuners (IA3, LoKr, VeRA, ...: no LoRA layer), the Conv / MHA LoRA
  cases (no nn.Linear target: PEFT's own layers either way), FSDP (needs a process group).
* ``test_initialization.py``: ``TestLoraInitialization`` (but PiSSA and MiCA, see :data:`SELECTION`),
  ``TestHotSwapping`` (with ``torch.compile`` on CPU).
* ``test_lora_variants.py``: ``TestLoraVariants``, ``TestActivatedLora``.
* ``test_low_level_api.py``: all of it but ``TestInjectAdapterFromStateDict`` (hub models throughout).

Not taken, with the reason: ``TestScaling`` and ``TestLowCpuMemUsage`` of ``test_initialization.py`` load a model
from the hub in every test; ``test_helpers.py``, ``test_tuners_utils.py`` and ``test_mixed.py`` need ``datasets`` /
``diffusers`` / ``parameterized`` beyond a module-level import; the decoder / encoder / seq-classifier files load
models from the hub; ``test_torch_compile.py`` and the GPU files need a GPU. The lane runs 813 tests in 80 s of CPU
time (4 min of wall time on a 2-core machine shared at load average 8), 10-15 s of it collecting PEFT's files.

Deselected inside the selection: :data:`DESELECTED` (each with its reason). A test that fails because of treelora is
fixed in treelora, never listed there.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import types

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported: the lane never uses the network

# The TestPeftCustomModel cases taken (its test methods x these configs): the plain LoRA cases on nn.Linear targets,
# which take treelora's fused path, then one case of each kind that must not (a variant, LoRA bias, a parameter
# target, transformers Conv1D with fan_in_fan_out). Every LoraConfig case on the MLP model plus the Conv1D ones would be
# 1,550 tests, about 6 minutes on 2 cores; the other variant cases (KaSA, MiCA, Monte-CLoRA, the other DoRA and VeLoRA
# cases) exercise the same fallback as the ones below.
CUSTOM_MODEL_CASES = [
    "Vanilla MLP 1 LoRA-MLP",
    "Vanilla MLP 2 LoRA-MLP",
    "Vanilla MLP 3 LoRA-MLP",
    "Vanilla MLP 4 LoRA-MLP",
    "Vanilla MLP 5 LoRA-MLP",  # modules_to_save
    "Vanilla MLP 6 LoRA-MLP",  # lora_alpha, dropout
    "Vanilla MLP 8 LoRA with DoRA-MLP",
    "Vanilla MLP 10 LoRA with VeLoRA random-MLP",
    "Vanilla MLP 1 LoRA with lora_b bias-MLP",
    "MLP 2 using nn.Parameter LoRA-MLP",  # target_parameters on an nn.Linear's weight: PEFT's ParamWrapper
    "BD-LoRA both A and B-MLP",
    "Embedding + transformers Conv1D 3 LoRA-EmbConv1D",
]
_CASES = "|".join(re.escape(case) for case in CUSTOM_MODEL_CASES)

# (file, node-id pattern): a collected test is selected when it is in that file and its id (the part after
# ``file::``) matches the pattern at its start.
SELECTION: list[tuple[str, str]] = [
    ("test_custom_models.py", rf"TestPeftCustomModel::\w+\[(?:{_CASES})-LoraConfig-"),
    ("test_custom_models.py", r"TestPeftCustomModel::\w*lora\w*(\[|$)"),
    ("test_custom_models.py", r"TestPeftCustomModel::test_multiple_adapters_mixed_modules_to_save"),
    ("test_custom_models.py", r"TestMultiRankAdapter::"),
    ("test_custom_models.py", r"TestLayerRepr::"),
    ("test_custom_models.py", r"TestMultipleActiveAdapters::\w+\[[^\]]*-LoraConfig-"),
    ("test_custom_models.py", r"TestRequiresGrad::\w*lora"),
    ("test_custom_models.py", r"TestMixedAdapterBatches::"),
    ("test_custom_models.py", r"TestDynamicDispatch::"),
    # PiSSA and MiCA initialisation (an SVD of every targeted weight: 10-60 s per test on 2 cores) are PEFT's init
    # algorithms; the forward after them is the plain one every other test takes.
    ("test_initialization.py", r"TestLoraInitialization::(?!test_lora_(pissa|mica)_)"),
    ("test_initialization.py", r"TestHotSwapping::"),
    ("test_lora_variants.py", r"TestLoraVariants::"),
    ("test_lora_variants.py", r"TestActivatedLora::"),
    ("test_low_level_api.py", r"(?!TestInjectAdapterFromStateDict::)"),
]

# Node-id patterns (matched with re.search) deselected from the selection, with the reason. None of them fails
# because of treelora. Hub access offline takes up to ~50 s per test before it fails, hence deselecting these rather
# than letting the network rule below skip them.
_HUB = "needs the network: loads a model from the hub"
DESELECTED: dict[str, str] = {
    r"TestDynamicDispatch::test_override_lora_linear": f"{_HUB} (peft-internal-testing/opt-125m)",
    r"TestLoraInitialization::test_load_pissa_olora_with_other_adapter_warns": _HUB,
    r"TestLoraInitialization::test_trainable_token_indices_targets_head_and_embedding": _HUB,
    r"TestLoraInitialization::test_lora_incompatible_mamba_modules": _HUB,
    r"TestLoraInitialization::test_nemotron_h_has_defaults_and_blocks_mamba_modules": _HUB,
    r"TestActivatedLora::test_gradient_checkpointing_": _HUB,
    r"TestPeftStateDict::test_get_peft_model_state_dict_removes_": f"{_HUB} (peft-internal-testing/opt-125m)",
    r"TestGetBaseModelStateDict::test_(strict_missing_keys|strict_unexpected_keys|multiple_adapters)": _HUB,
}

# Tests that fail in this checkout for a reason outside treelora.peft, run as strict expected failures: when the
# reason goes away they pass, the strict mark turns that into a failure, and the entry must be removed.
EXPECTED_FAILURES: dict[str, str] = {}

# What the stand-ins provide: the names PEFT's shared test modules import at module level.
_STAND_INS = {"diffusers": ("StableDiffusionPipeline",), "datasets": ("load_dataset",)}


class _Missing:
    """A name from a package that is not installed; using it says so."""

    def __init__(self, package: str, name: str) -> None:
        self._what = f"{package}.{name}"

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self._what} is not installed in this environment (PEFT-suite lane stand-in)")

    def __getattr__(self, attribute: str):
        raise RuntimeError(f"{self._what}.{attribute}: the package is not installed (PEFT-suite lane stand-in)")


def _install_stand_ins() -> None:
    for package, names in _STAND_INS.items():
        if package in sys.modules or importlib.util.find_spec(package) is not None:
            continue
        module = types.ModuleType(package)
        module.__doc__ = f"stand-in for the missing {package} package (tests/peft_suite/treelora_peft_suite.py)"
        for name in names:
            setattr(module, name, _Missing(package, name))
        sys.modules[package] = module


_install_stand_ins()

_counts = {"built": 0, "fused": 0}


def _count_treelora_activity() -> None:
    import treelora.peft as treelora_peft

    cls = treelora_peft.PeftLoRALinear
    init, fused = cls.__init__, treelora_peft.fused_lora_forward

    def counting_init(self, *args, **kwargs):
        _counts["built"] += 1
        init(self, *args, **kwargs)

    def counting_fused(*args, **kwargs):
        _counts["fused"] += 1
        return fused(*args, **kwargs)

    cls.__init__ = counting_init
    treelora_peft.fused_lora_forward = counting_fused


def pytest_configure(config):
    for marker in ("single_gpu_tests", "multi_gpu_tests", "regression", "bitsandbytes"):  # PEFT's own markers
        config.addinivalue_line("markers", f"{marker}: PEFT test marker")
    import treelora.peft

    treelora.peft.register()
    _count_treelora_activity()


def _selected(nodeid: str) -> bool:
    path, _, rest = nodeid.partition("::")
    filename = path.rsplit("/", 1)[-1]
    return any(filename == f and re.match(pattern, rest) for f, pattern in SELECTION)


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        reason = next((why for pattern, why in DESELECTED.items() if re.search(pattern, item.nodeid)), None)
        (keep if _selected(item.nodeid) and reason is None else drop).append(item)
        failing = next((why for pattern, why in EXPECTED_FAILURES.items() if re.search(pattern, item.nodeid)), None)
        if failing is not None:
            item.add_marker(pytest.mark.xfail(reason=failing, strict=True))
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep


def _needs_network(excinfo) -> bool:
    from huggingface_hub import errors

    hub_errors = tuple(
        getattr(errors, name) for name in ("OfflineModeIsEnabled", "LocalEntryNotFoundError") if hasattr(errors, name)
    )
    err = excinfo.value
    while err is not None:
        if isinstance(err, hub_errors):
            return True
        if isinstance(err, OSError) and "offline mode" in str(err).lower():
            return True
        err = err.__cause__ or err.__context__
    return False


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if call.excinfo is not None and report.failed and _needs_network(call.excinfo):
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, "needs the network (a model from the hub)")


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(
        f"treelora PEFT suite: {_counts['built']} treelora layers built, {_counts['fused']} fused forwards"
    )


def pytest_sessionfinish(session, exitstatus):
    # testscollected counts the tests left after deselection; a -k run that selects nothing is not a failure here
    if session.config.option.collectonly:
        return
    if session.testscollected and exitstatus == 0 and (_counts["built"] == 0 or _counts["fused"] == 0):
        session.exitstatus = 1
        print("treelora PEFT suite: no test built a treelora layer or ran its fused forward", file=sys.stderr)
