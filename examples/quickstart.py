"""Quickstart: which training examples made a small classifier predict what it did?

Trains an MLP on generated 2-D data with 3 classes, where 12 of the 300 training labels were
flipped on purpose. Then:

1. fits an influence estimator (exact Gauss-Newton curvature on all 211 parameters);
2. prints, for a few test points, the most helpful and most harmful training examples;
3. ranks training examples by self-influence, which flags the flipped labels.

Runs in a few seconds on a laptop CPU: ``python examples/quickstart.py``.
"""

import time

import torch
from torch.utils.data import DataLoader, TensorDataset

import influence


def make_data(n, seed, flip=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[0.0, 2.0], [-1.8, -1.0], [1.8, -1.0]])
    y = torch.randint(0, 3, (n,), generator=g)
    x = centers[y] + 0.8 * torch.randn(n, 2, generator=g)
    flipped = torch.randperm(n, generator=g)[:flip]
    y_noisy = y.clone()
    y_noisy[flipped] = (y[flipped] + 1 + torch.randint(0, 2, (flip,), generator=g)) % 3
    return x, y_noisy, flipped


def train(model, loader, epochs=60):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


def main():
    start = time.perf_counter()
    torch.manual_seed(0)
    x, y, flipped = make_data(300, seed=0, flip=12)
    x_test, y_test, _ = make_data(5, seed=1)
    train_loader = DataLoader(TensorDataset(x, y), batch_size=64)  # shuffle=False: index order
    test_loader = DataLoader(TensorDataset(x_test, y_test), batch_size=5)
    model = torch.nn.Sequential(
        torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
    )
    train(model, DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True))
    accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    print(f"trained: test accuracy {accuracy:.0%} on 5 points")

    estimator = influence.InfluenceEstimator(
        curvature=influence.Exact(curvature_type="ggn", damping=1e-3),
        task=influence.ClassificationTask(),
    ).fit(model, train_loader)
    print(f"fitted {type(estimator.curvature_).__name__} on {estimator.curvature_.num_params_} parameters")

    flipped_set = set(flipped.tolist())

    def describe(j):
        """A training example, marked when its label was flipped on purpose."""
        return f"#{j} (label {int(y[j])}{', FLIPPED' if j in flipped_set else ''})"

    helpful_v, helpful_i = estimator.top_k(test_loader, k=3)
    harmful_v, harmful_i = estimator.top_k(test_loader, k=3, largest=False)
    print("\nFLIPPED marks the 12 training labels flipped on purpose: harmful examples are often them.")
    for q in range(3):
        print(f"\nquery {q}: x={[round(v, 2) for v in x_test[q].tolist()]}, label {int(y_test[q])}")
        for name, values, idx in (("helpful", helpful_v, helpful_i), ("harmful", harmful_v, harmful_i)):
            items = ", ".join(f"{describe(int(j))} {float(v):+.3g}" for v, j in zip(values[q], idx[q]))
            print(f"  most {name}: {items}")

    self_influence = estimator.self_scores()
    suspects = torch.topk(self_influence, 12).indices.tolist()
    found = len(set(suspects) & flipped_set)
    print(f"\nhighest self-influence: {', '.join(describe(j) for j in suspects[:6])}, ...")
    print(f"self-influence: {found} of the 12 flipped labels are among the 12 highest-scoring examples")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
