"""Exceptions and warnings raised by the library.

Every error names what went wrong, what was expected and how to fix it.
"""

from __future__ import annotations


class InfluenceError(Exception):
    """Base class of the library's errors: ``except influence.InfluenceError`` catches them all.

    Each also derives from the built-in exception it refines (``NotFittedError`` is an
    ``AttributeError``, ``BatchFormatError`` a ``TypeError``, ...), so existing handlers keep
    working.

    Examples:
        >>> import influence
        >>> try:
        ...     influence.InfluenceEstimator(influence.Identity()).self_scores()
        ... except influence.InfluenceError as error:
        ...     print(type(error).__name__, isinstance(error, AttributeError))
        NotFittedError True
    """


class NotFittedError(InfluenceError, AttributeError):
    """A method that needs fitted state was called before ``fit``.

    Examples:
        >>> import influence
        >>> influence.InfluenceEstimator(influence.Identity()).self_scores()  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        influence.exceptions.NotFittedError: This InfluenceEstimator is not fitted yet: call fit(...) before self_scores().
    """


class BatchFormatError(InfluenceError, TypeError):
    """A task could not read a batch yielded by a loader.

    Examples:
        A loader of bare input tensors, without targets, for a classification task:

        >>> import torch, influence
        >>> model = torch.nn.Linear(3, 2)
        >>> est = influence.InfluenceEstimator(influence.Identity(), influence.ClassificationTask())
        >>> est.fit(model, [torch.randn(6, 3)])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        influence.exceptions.BatchFormatError: ClassificationTask could not read a batch of type Tensor(6, 3): expected (inputs, targets) ...
    """


class NonFiniteGradientError(InfluenceError, FloatingPointError):
    """Per-example gradients contained NaN or inf values.

    Examples:
        ``sqrt`` at 0 has a finite value but an infinite derivative:

        >>> import torch, influence
        >>> class Sqrt(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.w = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
        ...     def forward(self, x):
        ...         return x * self.w.sqrt()
        >>> data = [(torch.randn(4, 2, dtype=torch.float64), torch.tensor([0, 1, 1, 0]))]
        >>> est = influence.InfluenceEstimator(influence.Identity()).fit(Sqrt(), data)
        >>> est.self_scores()  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        influence.exceptions.NonFiniteGradientError: NaN or inf gradients for 4 train example(s) at indices [0, 1, 2, 3]. ...
    """


class ModelChangedError(InfluenceError, RuntimeError):
    """The model's attributed parameters changed after ``fit``.

    Examples:
        >>> import torch, influence
        >>> model = torch.nn.Linear(3, 2).double()
        >>> data = [(torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1, 0]))]
        >>> est = influence.InfluenceEstimator(influence.Identity()).fit(model, data)
        >>> with torch.no_grad():
        ...     _ = model.weight.add_(1.0)  # e.g. one more training step
        >>> est.pairwise_scores(data)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        influence.exceptions.ModelChangedError: The model changed after fit(): values of attributed parameters ['weight']. ...
    """


class StochasticModelError(InfluenceError, RuntimeError):
    """The model gives different losses on two identical calls (dropout or sampling active).

    Examples:
        >>> import torch, influence
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Dropout(0.5))  # train mode
        >>> data = [(torch.randn(8, 3), torch.tensor([0, 1, 1, 0, 1, 0, 0, 1]))]
        >>> influence.InfluenceEstimator(influence.Identity()).fit(model, data)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        influence.exceptions.StochasticModelError: The model is stochastic in this mode: ... Call model.eval() before fit() and scoring, ...
        >>> est = influence.InfluenceEstimator(influence.Identity()).fit(model.eval(), data)  # the fix
    """


class CurvatureError(InfluenceError, RuntimeError):
    """A curvature could not be fitted or applied (too large, not positive definite, ...).

    Examples:
        Six examples give an empirical Fisher of rank at most 6 over 8 parameters: singular
        without damping. The message suggests a damping.

        >>> import torch, influence
        >>> model = torch.nn.Linear(3, 2).double()
        >>> data = [(torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1, 0]))]
        >>> est = influence.InfluenceEstimator(influence.Exact(damping=0.0, curvature_type="fisher"))
        >>> est.fit(model, data).pairwise_scores(data)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        influence.exceptions.CurvatureError: Exact('fisher'): C + damping·I at damping=0 is singular: ... Use damping > ...
    """


class RunLockedError(InfluenceError, RuntimeError):
    """Another process is writing the same score file or checkpoint directory.

    Examples:
        A second run writing ``scores.npy`` while the first holds its lock fails at once
        (here the first run's lock is taken by hand):

        >>> import fcntl, os, tempfile
        >>> import torch, influence
        >>> model = torch.nn.Linear(3, 2).double()
        >>> data = [(torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1, 0]))]
        >>> est = influence.InfluenceEstimator(influence.Identity()).fit(model, data)
        >>> path = os.path.join(tempfile.mkdtemp(), "scores.npy")
        >>> first_run = open(path + ".lock", "w")
        >>> fcntl.flock(first_run, fcntl.LOCK_EX)
        >>> est.pairwise_scores(data, out=path)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        influence.exceptions.RunLockedError: The score file ... is being written by another process ...
        >>> first_run.close()  # the first run ends: the file can be written
        >>> est.pairwise_scores(data, out=path).shape
        (6, 6)
    """


class DistributedTimeoutError(InfluenceError, TimeoutError):
    """Under ``torch.distributed``, a rank did not reach a collective within ``distributed_timeout``.

    It is also a ``TimeoutError``; the message names the collective and the ranks that did not
    arrive. Raising it needs several processes, one of them stalled
    (``tests/test_distributed_checks.py``); catching it:

    Examples:
        >>> import influence
        >>> issubclass(influence.DistributedTimeoutError, TimeoutError)
        True
    """


class ConvergenceWarning(UserWarning):
    """An iterative solver stopped before reaching its tolerance.

    Examples:
        One CG iteration is not enough for a tolerance of ``1e-6``:

        >>> import warnings
        >>> import torch, influence
        >>> model = torch.nn.Linear(3, 2).double()
        >>> data = [(torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1, 0]))]
        >>> est = influence.InfluenceEstimator(influence.CG(damping=1e-3, max_iter=1)).fit(model, data)
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always", influence.ConvergenceWarning)
        ...     scores = est.pairwise_scores(data)
        >>> [str(w.message)[:26] for w in caught if w.category is influence.ConvergenceWarning]
        ['CG reached max_iter=1 with']
    """


class FallbackWarning(UserWarning):
    """A slower or coarser code path was taken; the warning says which and why.

    Examples:
        A forward that reads a tensor's value (``.item()``) cannot be vmapped, so per-example
        gradients fall back to an exact loop over the examples:

        >>> import warnings
        >>> import torch, influence
        >>> class ReadsValues(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.linear = torch.nn.Linear(3, 2)
        ...     def forward(self, x):
        ...         return self.linear(x) * (2.0 if x.sum().item() > 1e9 else 1.0)
        >>> batch = (torch.randn(4, 3), torch.tensor([0, 1, 1, 0]))
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always", influence.FallbackWarning)
        ...     grads = influence.per_sample_grads(ReadsValues(), influence.ClassificationTask(), batch)
        >>> grads.shape, any(w.category is influence.FallbackWarning for w in caught)
        (torch.Size([4, 8]), True)
    """
