"""A 2-D map of heads from their mean pairwise divergence, as Clark et al. (2019) drew BERT's heads.

Distance between heads a and b: d_ab = sqrt(D_ab), D the mean divergence (JS in nats, or the
squared Hellinger distance). The square root of JS is a metric (Endres & Schindelin 2003), and so
is the square root of a mean of squared metrics, so d is a proper distance to embed.

Embedding: classical (Torgerson) multidimensional scaling. B = -1/2 J d^2 J with J = I - 11^T / n
the centring matrix; the coordinates are the top eigenvectors of B scaled by the square roots of
their eigenvalues. For distances that are Euclidean in 2-D this recovers the points exactly (up
to rotation and reflection); otherwise it is the best rank-2 fit of B. Each axis's sign is fixed
so that the point farthest along it lies on the positive side, so a map does not flip between runs.
"""

from __future__ import annotations

import numpy as np

from llm_heatmap.errors import InputError


def classical_mds(distance, dims: int = 2) -> np.ndarray:
    """`"n dims"` coordinates whose Euclidean distances best match the symmetric `distance` `"n n"`."""
    distance = np.asarray(distance, dtype=float)
    n = len(distance)
    if distance.shape != (n, n) or n < 1:
        raise InputError(f"classical_mds needs a square distance matrix, got shape {distance.shape}.")
    centre = np.eye(n) - 1 / n
    gram = -0.5 * centre @ (distance ** 2) @ centre
    values, vectors = np.linalg.eigh((gram + gram.T) / 2)
    top = np.argsort(values)[::-1][:dims]
    coordinates = vectors[:, top] * np.sqrt(values[top].clip(min=0))
    if coordinates.shape[1] < dims:
        coordinates = np.pad(coordinates, ((0, 0), (0, dims - coordinates.shape[1])))
    farthest = np.abs(coordinates).argmax(0)
    signs = np.sign(coordinates[farthest, np.arange(dims)])
    return coordinates * np.where(signs == 0, 1, signs)


def head_map(divergence) -> np.ndarray:
    """`"n 2"` map coordinates of heads from their mean divergence (module docstring)."""
    return classical_mds(np.sqrt(np.asarray(divergence, dtype=float).clip(min=0)))
