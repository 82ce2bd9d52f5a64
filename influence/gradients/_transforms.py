"""What torch.func transforms need from a model, and what to tell the user when they fail.

Three helpers shared by the per-example gradients (:mod:`.functional`) and the curvature
products (:mod:`influence.curvature._products`):

- :func:`transform_kernels`: a context that routes a model through kernels the transforms can
  differentiate. Fused kernels have no forward-mode AD formula (and often no vmap batching
  rule): PyTorch's flash/memory-efficient ``scaled_dot_product_attention`` (HuggingFace's
  default ``attn_implementation="sdpa"``, ``nn.MultiheadAttention``), the
  ``nn.TransformerEncoderLayer`` / ``nn.MultiheadAttention`` inference fast path (taken in eval
  mode under ``no_grad``) and the oneDNN (mkldnn) LSTM on the CPU. Inside the context,
  attention uses the math backend (the same function, composed of matmuls and a softmax), the
  fast path is off, and oneDNN is off for models with recurrent layers.
- :func:`batching_rule_warnings`: catches torch's "There is a performance drop because we have
  not yet implemented the batching rule for ..." warnings (one per call and operation) and
  emits one :class:`~influence.FallbackWarning` per model and operation instead, in our words.
- :func:`explain_failure`: a short reason and a fix for an exception raised by a transform.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import traceback
import warnings
import weakref
from typing import Iterator

import torch
from torch import nn

from ..exceptions import FallbackWarning

_PERFORMANCE_DROP = "There is a performance drop because we have not yet implemented the batching rule"
_OP_NAME = re.compile(r"batching rule for ([\w:.]*\w)")

# operations reported per model, so that each is reported once
_REPORTED_OPS: "weakref.WeakKeyDictionary[nn.Module, set[str]]" = weakref.WeakKeyDictionary()

HF_EAGER_FIX = (
    'load the model with attn_implementation="eager" (from_pretrained(..., '
    'attn_implementation="eager"), or call model.set_attn_implementation("eager"))'
)


@contextlib.contextmanager
def transform_kernels(model: nn.Module) -> Iterator[None]:
    """Math SDPA backend, no MHA fast path, and no oneDNN for recurrent models, restored after.

    The math backend computes the same attention as the fused kernels (up to rounding) from
    differentiable primitives, so forward-mode AD and vmap work through it.
    """
    mha = getattr(torch.backends, "mha", None)  # torch >= 2.2
    fastpath = mha.get_fastpath_enabled() if hasattr(mha, "set_fastpath_enabled") else None
    with contextlib.ExitStack() as stack:
        try:  # torch >= 2.3
            from torch.nn.attention import SDPBackend, sdpa_kernel

            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        except ImportError:
            pass
        if any(isinstance(m, nn.RNNBase) for m in model.modules()):
            stack.enter_context(_without_onednn())
        if fastpath is not None:
            mha.set_fastpath_enabled(False)
        try:
            yield
        finally:
            if fastpath is not None:
                mha.set_fastpath_enabled(fastpath)


def _without_onednn() -> contextlib.AbstractContextManager:
    """``torch.backends.mkldnn.flags(enabled=False)`` leaving its other flags alone: each is
    passed as its current value or ``None`` ("unchanged"), since the defaults would change them
    (and setting oneDNN's TF32 flag warns on CPU builds)."""
    mkldnn = torch.backends.mkldnn
    others = [name for name in inspect.signature(mkldnn.flags).parameters if name != "enabled"]
    return mkldnn.flags(enabled=False, **{name: getattr(mkldnn, name, None) for name in others})


def _op_fix(op: str) -> str:
    """How to avoid an operation that the transforms cannot handle well, if we know one."""
    if "scaled_dot_product" in op or "attention" in op:
        return (
            "for a HuggingFace model, " + HF_EAGER_FIX + "; for torch attention, run under "
            "torch.nn.attention.sdpa_kernel(SDPBackend.MATH) (fused attention kernel)"
        )
    if "mkldnn" in op:
        return "run under torch.backends.mkldnn.flags(enabled=False) (a oneDNN CPU kernel)"
    if "transformer_encoder_layer" in op or "native_multi_head" in op:
        return (
            "call torch.backends.mha.set_fastpath_enabled(False) (the nn.MultiheadAttention "
            "inference fast path)"
        )
    return ""


@contextlib.contextmanager
def batching_rule_warnings(model: nn.Module, what: str) -> Iterator[None]:
    """Replaces torch's per-call "performance drop ... batching rule" warnings by one of ours.

    Every other warning raised inside is re-emitted unchanged. ``what`` says which computation
    ran (e.g. ``"per-example gradients"``).
    """
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.filterwarnings("always", message=_PERFORMANCE_DROP)
            yield
    finally:
        ops = []
        for w in caught:  # outside the recording context, so re-emitted ones are not caught
            match = _OP_NAME.search(str(w.message))
            if str(w.message).startswith(_PERFORMANCE_DROP) and match:
                ops.append(match.group(1))
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    reported = _REPORTED_OPS.setdefault(model, set())
    new = sorted(set(ops) - reported)
    if not new:
        return
    reported.update(new)
    fixes = list(dict.fromkeys(_op_fix(op) for op in new if _op_fix(op)))
    warnings.warn(
        f"torch.func.vmap has no batching rule for {', '.join(new)}, so it runs "
        f"{'this operation' if len(new) == 1 else 'these operations'} one batch element at a time "
        f"while computing {what} of this {type(model).__name__}: results are exact, only slower."
        + (f" To avoid the slow path, {'; '.join(fixes)}." if fixes else "")
        + " (Reported once per model and operation.)",
        FallbackWarning,
        stacklevel=4,
    )


def first_sentence(message: str, limit: int = 160) -> str:
    """The error's first sentence, whole when short, else cut at a word with an ellipsis."""
    first = message.strip().splitlines()[0] if message.strip() else ""
    sentence = re.split(r"(?<=[.!?])\s+(?=[A-Z])", first, maxsplit=1)[0].rstrip(".")
    if len(sentence) > limit:
        sentence = sentence[:limit].rsplit(" ", 1)[0] + " ..."
    return sentence


def _non_eager_attention(model: nn.Module) -> str | None:
    """The ``attn_implementation`` of a HuggingFace model when it is not ``"eager"``."""
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    return impl if isinstance(impl, str) and impl != "eager" else None


def _in_attention_code(error: BaseException) -> bool:
    frames = traceback.extract_tb(error.__traceback__)
    pattern = re.compile(r"attention|attn|mask|sdpa|flash", re.IGNORECASE)
    return any(pattern.search(f.filename.rsplit("/", 1)[-1]) or pattern.search(f.name) for f in frames) or bool(
        pattern.search(str(error).splitlines()[0] if str(error) else "")
    )


def _raised_in_torch(error: BaseException) -> bool:
    """Whether the failing line is in PyTorch's own Python code (nothing for the user to edit)."""
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and "/torch/" in frames[-1].filename.replace("\\", "/")


# (test on torch's message, reason, fix, whether the fix edits the failing line's code)
_CAUSES = (
    (
        lambda m: "data-dependent control flow" in m or ".item()" in m,
        "it reads tensor values in Python (an if on a tensor, .item(), .tolist())",
        "replace Python branches on tensor values by tensor operations (torch.where)",
        True,
    ),
    (lambda m: "forward AD" in m, "{op} has no forward-mode AD formula", "", False),
    (lambda m: "batching rule" in m.lower(), "{op} has no vmap batching rule", "", False),
    (
        lambda m: "setup_context" in m or "autograd.Function" in m,
        "a custom torch.autograd.Function does not support torch.func transforms",
        "give the Function a setup_context staticmethod (and jvp/vmap ones), see 'Extending "
        "torch.func with autograd.Function' in the PyTorch docs",
        False,
    ),
    (
        lambda m: "inplace" in m or "in-place" in m or "broadcast shape" in m,
        "it writes per-example values in place into a tensor shared by all examples ({detail})",
        "replace the in-place update by an out-of-place one (x = x + y instead of x += y)",
        True,
    ),
)


def explain_failure(model: nn.Module, error: BaseException) -> tuple[str, str]:
    """``(reason, fix)``: why a torch.func transform failed on ``model``, and what to do.

    Both are phrases (the fix may be empty). The reason classifies torch's common messages;
    anything else is quoted by its first sentence. The fix, by priority: a HuggingFace model
    whose non-eager attention code failed gets ``attn_implementation="eager"``; a known fused
    kernel its switch; otherwise the cause's generic fix (not for a line in PyTorch's code).
    """
    message = str(error)
    found = re.search(r"(?:forward AD with|batching rule for|implemented for) ([\w:.]*\w)", message)
    op = found.group(1) if found else None
    reason, fix = f"{type(error).__name__}: {first_sentence(message)}", ""
    for matches, template, generic_fix, edits_failing_line in _CAUSES:
        if matches(message):
            reason = template.format(op=op or "an operation", detail=first_sentence(message, 100))
            fix = "" if edits_failing_line and _raised_in_torch(error) else generic_fix
            break
    impl = _non_eager_attention(model)
    if impl is not None and _in_attention_code(error):
        fix = f"this HuggingFace model uses attn_implementation={impl!r}: {HF_EAGER_FIX}"
    elif op and _op_fix(op):
        fix = _op_fix(op)
    return reason, fix
