"""The held-out validation images of the "validation" protocol: a seeded, stratified subset of the
training split (the seed's paper: Corel-5k is "usually divided into a training set of 4000 images,
a validation set of 500 images, and a test set of 499 images")."""
from __future__ import annotations

import numpy as np


def validation_indices(targets: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted indices of `size` validation images among the rows of `targets` (0/1 [N, C]).

    1. Rare labels: every label with at least 2 images gets one on each side where possible.
       Labels are visited rarest first; one still absent from the validation side moves one of
       its images there, chosen at random among those whose move leaves every one of their
       labels at least one training image.
    2. The rest by iterative stratification (Sechidis et al., ECML 2011): the label with the
       fewest unassigned images goes first; each of its images joins the side that still wants
       that label most (wanted = the label's count x the side's share, less what it holds), ties
       broken by the side's remaining room, then at random; a full side takes no more. An image
       that is the last unassigned one of a label (of at least 2 images) with no training image
       yet goes to training while training has room, so step 1's promise holds.
    The same (targets, size, seed) always gives the same subset.
    """
    targets = np.asarray(targets) > 0
    num_images = targets.shape[0]
    if not 0 < size < num_images:
        raise ValueError(f"validation size {size} must lie in [1, {num_images - 1}] for "
                         f"{num_images} training images")
    rng = np.random.default_rng(seed)
    counts = targets.sum(axis=0)
    left_in_train = counts.astype(np.int64)
    chosen = np.zeros(num_images, bool)
    for label in np.argsort(counts, kind="stable"):  # 1. rarest first
        carriers = targets[:, label]
        if chosen.sum() == size or carriers.sum() < 2 or (chosen & carriers).any():
            continue
        for image in rng.permutation(np.flatnonzero(carriers & ~chosen)):
            if np.all(left_in_train[targets[image]] >= 2):
                chosen[image] = True
                left_in_train[targets[image]] -= 1
                break

    share = size / num_images  # 2. iterative stratification of the unassigned images
    wanted = {True: counts * share - targets[chosen].sum(axis=0), False: counts * (1 - share)}
    room = {True: size - int(chosen.sum()), False: num_images - size}
    unassigned = ~chosen
    in_train = np.zeros_like(left_in_train)  # per label, the images assigned to training so far
    unassigned_per_label = targets[unassigned].sum(axis=0)
    needs_train = counts >= 2
    while unassigned.any():
        left_per_label = targets[unassigned].sum(axis=0)
        labels = np.flatnonzero(left_per_label)
        label = labels[np.argmin(left_per_label[labels])] if labels.size else None
        group = unassigned & targets[:, label] if label is not None else unassigned
        for image in rng.permutation(np.flatnonzero(group)):
            last_chance = (targets[image] & needs_train & (in_train == 0)
                           & (unassigned_per_label == 1)).any()
            if not room[True] or not room[False]:
                to_validation = bool(room[True])
            else:
                desire = (wanted[True][label], wanted[False][label]) if label is not None else (0, 0)
                key = [(desire[0], room[True], rng.random()), (desire[1], room[False], rng.random())]
                to_validation = key[0] > key[1] and not last_chance
            chosen[image] = to_validation
            unassigned[image] = False
            wanted[to_validation] = wanted[to_validation] - targets[image]
            room[to_validation] -= 1
            unassigned_per_label -= targets[image]
            if not to_validation:
                in_train += targets[image]
    return np.flatnonzero(chosen)
