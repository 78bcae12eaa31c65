"""Figures for the training report, drawn with cv2 (the project does not depend on matplotlib)."""

from __future__ import annotations

import math

import cv2
import numpy as np

_INK = (40, 40, 40)
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def image_grid(images: np.ndarray, columns: int, scale: int = 1, gap: int = 2) -> np.ndarray:
    """(N, H, W, 3) RGB uint8 -> one RGB image, ``columns`` wide, pixels scaled up (nearest)."""
    n, h, w, _ = images.shape
    rows = math.ceil(n / columns)
    hs, ws = h * scale, w * scale
    grid = np.full((rows * (hs + gap) + gap, columns * (ws + gap) + gap, 3), 255, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        y, x = gap + r * (hs + gap), gap + c * (ws + gap)
        grid[y : y + hs, x : x + ws] = cv2.resize(image, (ws, hs), interpolation=cv2.INTER_NEAREST)
    return grid


def titled(image: np.ndarray, title: str, height: int = 34) -> np.ndarray:
    band = np.full((height, image.shape[1], 3), 255, np.uint8)
    cv2.putText(band, title, (8, height - 11), _FONT, 0.6, _INK, 1, cv2.LINE_AA)
    return np.concatenate([band, image], axis=0)


def side_by_side(*images: np.ndarray, gap: int = 16) -> np.ndarray:
    height = max(i.shape[0] for i in images)
    padded = []
    for i, image in enumerate(images):
        pad = np.full((height - image.shape[0], image.shape[1], 3), 255, np.uint8)
        padded.append(np.concatenate([image, pad], axis=0))
        if i < len(images) - 1:
            padded.append(np.full((height, gap, 3), 255, np.uint8))
    return np.concatenate(padded, axis=1)


def loss_plot(losses: list[float], title: str, size: tuple[int, int] = (900, 500), smooth: int = 50) -> np.ndarray:
    """Training loss per step (faint) and its running mean (bold), log-scaled y; RGB uint8."""
    w, h = size
    left, right, top, bottom = 80, 20, 40, 50
    img = np.full((h, w, 3), 255, np.uint8)
    y = np.log10(np.maximum(np.asarray(losses, np.float64), 1e-6))
    kernel = np.ones(min(smooth, len(y))) / min(smooth, len(y))
    mean = np.convolve(y, kernel, mode="valid")
    lo, hi = math.floor(y.min() * 2) / 2, math.ceil(y.max() * 2) / 2
    hi = max(hi, lo + 0.5)

    def px(step: np.ndarray, value: np.ndarray) -> np.ndarray:
        xs = left + (w - left - right) * step / max(1, len(losses) - 1)
        ys = top + (h - top - bottom) * (hi - value) / (hi - lo)
        return np.stack([xs, ys], axis=1).round().astype(np.int32)

    # axes, grid lines at each decade and half decade, labels
    for v in np.arange(lo, hi + 1e-9, 0.5):
        yy = int(px(np.array([0.0]), np.array([v]))[0, 1])
        cv2.line(img, (left, yy), (w - right, yy), (225, 225, 225), 1)
        cv2.putText(img, f"{10**v:.3g}", (8, yy + 5), _FONT, 0.45, _INK, 1, cv2.LINE_AA)
    for frac in np.linspace(0, 1, 6):
        step = frac * (len(losses) - 1)
        xx = int(px(np.array([step]), np.array([lo]))[0, 0])
        cv2.line(img, (xx, h - bottom), (xx, h - bottom + 5), _INK, 1)
        cv2.putText(img, f"{int(step)}", (xx - 15, h - bottom + 22), _FONT, 0.45, _INK, 1, cv2.LINE_AA)
    cv2.rectangle(img, (left, top), (w - right, h - bottom), _INK, 1)
    cv2.polylines(img, [px(np.arange(len(y)), y)], False, (190, 205, 235), 1, cv2.LINE_AA)
    offset = (len(y) - len(mean)) / 2
    cv2.polylines(img, [px(np.arange(len(mean)) + offset, mean)], False, (30, 80, 200), 2, cv2.LINE_AA)
    cv2.putText(img, title, (left, 26), _FONT, 0.6, _INK, 1, cv2.LINE_AA)
    cv2.putText(img, "training step", (w // 2 - 50, h - 8), _FONT, 0.5, _INK, 1, cv2.LINE_AA)
    return img


def write_rgb(path, image: np.ndarray) -> None:
    if not cv2.imwrite(str(path), np.ascontiguousarray(image[..., ::-1])):
        raise OSError(f"could not write {path}")
