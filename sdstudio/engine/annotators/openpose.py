"""OpenPose as the extension runs it: the CMU body network (``body_pose_model.pth``; 18 COCO keypoints joined by
part affinity fields), the hand network (``hand_pose_model.pth``; 21 keypoints in boxes guessed from the arms)
and the face network (``facenet.pth``; landmarks in a box guessed from the head), then the skeleton drawn on
black in the extension's colours.

The networks are VGG-19 feature stacks followed by six refinement stages of 7×7 convolutions; the files keep
each layer under its Caffe name (``conv1_1``, ``Mconv7_stage6_L2``…), and the modules here use those names.
All three read BGR scaled as ``x / 256 - 0.5`` (the extension flips its RGB picture first).

Decoding follows the extension step by step (its body search at one scale, 0.5 × 368 / height; the hand network
averaged over four box sizes; thresholds 0.1 / 0.05) so that a pose comes out where the extension finds it.
Keypoints are drawn from double-precision coordinates, which is what the extension does under the NumPy 1.x
that A1111 pins (NumPy 2 would multiply its float32 hand and face points in single precision, one pixel off
now and then).
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from torch import nn

from .common import AnnotatorFile, cached_network

BODY = AnnotatorFile("body_pose_model.pth", "openpose")
HAND = AnnotatorFile("hand_pose_model.pth", "openpose")
FACE = AnnotatorFile("facenet.pth", "openpose")

# --- networks --------------------------------------------------------------------------------------------------

# (name, in, out, kernel) of the VGG front, "pool" for a 2×2 max-pool; every convolution is followed by a ReLU
_VGG = [("conv1_1", 3, 64, 3), ("conv1_2", 64, 64, 3), "pool", ("conv2_1", 64, 128, 3), ("conv2_2", 128, 128, 3),
        "pool", ("conv3_1", 128, 256, 3), ("conv3_2", 256, 256, 3), ("conv3_3", 256, 256, 3),
        ("conv3_4", 256, 256, 3), "pool", ("conv4_1", 256, 512, 3), ("conv4_2", 512, 512, 3)]
_BODY_FRONT = _VGG + [("conv4_3_CPM", 512, 256, 3), ("conv4_4_CPM", 256, 128, 3)]
_HAND_FRONT = _VGG + [("conv4_3", 512, 512, 3), ("conv4_4", 512, 512, 3), ("conv5_1", 512, 512, 3),
                      ("conv5_2", 512, 512, 3), ("conv5_3_CPM", 512, 128, 3)]


def _stage(suffix: str, cin: int, cout: int) -> list[tuple[str, int, int, int]]:
    """A refinement stage: five 7×7 and two 1×1 convolutions, ``Mconv1…7`` + suffix."""
    return [(f"Mconv1{suffix}", cin, 128, 7)] + [(f"Mconv{i}{suffix}", 128, 128, 7) for i in range(2, 6)] + [
        (f"Mconv6{suffix}", 128, 128, 1), (f"Mconv7{suffix}", 128, cout, 1)]


class _Layers(nn.Module):
    """Convolutions registered under their file names, run in order; ReLU after each but those in ``linear``."""

    def __init__(self, owner: nn.Module, layers: list, linear: set[str]):
        super().__init__()
        self.steps: list[tuple[str, bool]] = []
        for layer in layers:
            if layer == "pool":
                self.steps.append(("pool", False))
                continue
            name, cin, cout, k = layer
            owner.add_module(name, nn.Conv2d(cin, cout, k, padding=k // 2))
            self.steps.append((name, name not in linear))
        self._owner = [owner]  # not a submodule: the convolutions belong to the owner's flat namespace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        owner = self._owner[0]
        for name, relu in self.steps:
            if name == "pool":
                x = F.max_pool2d(x, 2, 2)
            else:
                x = getattr(owner, name)(x)
                if relu:
                    x = torch.relu(x)
        return x


class BodyNet(nn.Module):
    """Two branches per stage: part affinity fields (L1, 38 channels) and heatmaps (L2, 19). As in the network
    the extension runs, the last heatmap layer keeps its ReLU (its list of linear layers names stage 6's L1
    twice and never its L2)."""

    def __init__(self):
        super().__init__()
        linear = {"conv5_5_CPM_L1", "conv5_5_CPM_L2"} | {f"Mconv7_stage{s}_L{b}" for s in range(2, 6) for b in (1, 2)}
        linear.add("Mconv7_stage6_L1")
        self._front = _Layers(self, _BODY_FRONT, linear)
        self._branches = []
        for b, cout in ((1, 38), (2, 19)):
            first = [(f"conv5_{i}_CPM_L{b}", 128, 128, 3) for i in (1, 2, 3)] + [
                (f"conv5_4_CPM_L{b}", 128, 512, 1), (f"conv5_5_CPM_L{b}", 512, cout, 1)]
            stages = [_Layers(self, first, linear)]
            stages += [_Layers(self, _stage(f"_stage{s}_L{b}", 185, cout), linear) for s in range(2, 7)]
            self._branches.append(stages)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self._front(x)
        h = features
        for stage in range(6):
            paf, heat = self._branches[0][stage](h), self._branches[1][stage](h)
            h = torch.cat([paf, heat, features], 1)
        return paf, heat


class HandNet(nn.Module):
    """22 heatmaps (21 keypoints and background), refined over six stages."""

    def __init__(self):
        super().__init__()
        linear = {"conv6_2_CPM"} | {f"Mconv7_stage{s}" for s in range(2, 7)}
        self._front = _Layers(self, _HAND_FRONT, linear)
        self._stages = [_Layers(self, [("conv6_1_CPM", 128, 512, 1), ("conv6_2_CPM", 512, 22, 1)], linear)]
        self._stages += [_Layers(self, _stage(f"_stage{s}", 150, 22), linear) for s in range(2, 7)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self._front(x)
        out = self._stages[0](features)
        for stage in self._stages[1:]:
            out = stage(torch.cat([out, features], 1))
        return out


class FaceNet(nn.Module):
    """71 heatmaps (70 landmarks and background); the same shape as the hand network but 71 outputs and every
    refinement layer but the last followed by a ReLU."""

    def __init__(self):
        super().__init__()
        linear = {"conv6_2_CPM"} | {f"Mconv7_stage{s}" for s in range(2, 7)}
        self._front = _Layers(self, _HAND_FRONT, linear)
        self._stages = [_Layers(self, [("conv6_1_CPM", 128, 512, 1), ("conv6_2_CPM", 512, 71, 1)], linear)]
        self._stages += [_Layers(self, _stage(f"_stage{s}", 199, 71), linear) for s in range(2, 7)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self._front(x)
        out = self._stages[0](features)
        for stage in self._stages[1:]:
            out = stage(torch.cat([out, features], 1))
        return out


def load_body(path) -> BodyNet:
    return cached_network(path, "openpose_body", lambda weights: BodyNet())


def load_hand(path) -> HandNet:
    return cached_network(path, "openpose_hand", lambda weights: HandNet())


def load_face(path) -> FaceNet:
    return cached_network(path, "openpose_face", lambda weights: FaceNet())


# --- resizing as the extension does it -------------------------------------------------------------------------

def _resize(x: np.ndarray, height: float, width: float) -> np.ndarray:
    """cv2 resize, area when shrinking and Lanczos when growing (judged on height + width), channel by channel
    for arrays that are not 1- or 3-channel."""
    ho, wo = x.shape[:2]
    channels = 1 if x.ndim == 2 else x.shape[2]
    if channels not in (1, 3):
        return np.stack([_resize(x[:, :, i], height, width) for i in range(channels)], axis=2)
    shrink = (height + width) / float(ho + wo) < 1
    return cv2.resize(x, (int(width), int(height)), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LANCZOS4)


def _pad(image: np.ndarray, stride: int = 8, value: int = 128) -> tuple[np.ndarray, int, int]:
    h, w = image.shape[:2]
    ph, pw = -h % stride, -w % stride
    return np.pad(image, [[0, ph], [0, pw], [0, 0]], constant_values=value), ph, pw


@torch.no_grad()
def _run(net: nn.Module, bgr: np.ndarray) -> torch.Tensor | tuple[torch.Tensor, ...]:
    param = next(net.parameters())
    x = torch.from_numpy(np.ascontiguousarray(bgr.transpose(2, 0, 1)[None], np.float32) / 256.0 - 0.5)
    return net(x.to(param.device, param.dtype))


def _maps(out: torch.Tensor, padded: tuple[int, int], pads: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """A network output (1×C×h×w at stride 8) back to H×W×C: ×8, padding cut, resized to ``size``."""
    maps = out[0].float().cpu().numpy().transpose(1, 2, 0)
    maps = _resize(maps, maps.shape[0] * 8, maps.shape[1] * 8)
    maps = maps[:padded[0] - pads[0], :padded[1] - pads[1]]
    return _resize(maps, *size)


# --- body -------------------------------------------------------------------------------------------------------

# limbs as 1-based keypoint pairs, and for each the PAF channels (x, y) that score it
LIMBS = [(2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11), (2, 12), (12, 13), (13, 14),
         (2, 1), (1, 15), (15, 17), (1, 16), (16, 18), (3, 17), (6, 18)]
PAF_CHANNELS = [(12, 13), (20, 21), (14, 15), (16, 17), (22, 23), (24, 25), (0, 1), (2, 3), (4, 5), (6, 7),
                (8, 9), (10, 11), (28, 29), (30, 31), (34, 35), (32, 33), (36, 37), (18, 19), (26, 27)]
PEAK_THRESHOLD = 0.1
PAF_THRESHOLD = 0.05
BOX = 368


@dataclass(frozen=True)
class Keypoint:
    x: float
    y: float
    score: float = 1.0


@dataclass
class Pose:
    """One person: 18 body keypoints (None: not found), hands and face as keypoint lists (or None). Coordinates
    are fractions of the picture's width and height once :func:`detect_poses` returns them."""

    body: list[Keypoint | None]
    left_hand: list[Keypoint] | None = None
    right_hand: list[Keypoint] | None = None
    face: list[Keypoint] | None = None


def find_peaks(heatmaps: np.ndarray, threshold: float = PEAK_THRESHOLD) -> list[list[tuple[float, float, float, int]]]:
    """Per part (the first 18 channels): the local maxima of the σ-3 smoothed map above ``threshold`` (ties to
    the four neighbours kept), as (x, y, raw score, running id), in row-major order."""
    peaks, counter = [], 0
    for part in range(18):
        raw = heatmaps[:, :, part]
        smooth = gaussian_filter(raw, sigma=3)
        up, down, left, right = (np.zeros_like(smooth) for _ in range(4))
        up[1:, :], down[:-1, :] = smooth[:-1, :], smooth[1:, :]
        left[:, 1:], right[:, :-1] = smooth[:, :-1], smooth[:, 1:]
        binary = (smooth >= up) & (smooth >= down) & (smooth >= left) & (smooth >= right) & (smooth > threshold)
        ys, xs = np.nonzero(binary)
        found = [(int(x), int(y), float(raw[y, x]), counter + i) for i, (y, x) in enumerate(zip(ys, xs))]
        counter += len(found)
        peaks.append(found)
    return peaks


def _connections(peaks: list, pafs: np.ndarray, height: int) -> list[np.ndarray | None]:
    """For each limb, the accepted (id A, id B, score, index A, index B) rows: candidate pairs scored by the PAF
    sampled at 10 points along the segment (with a penalty for limbs longer than half the picture), kept greedily
    by score without reusing either end."""
    out: list[np.ndarray | None] = []
    for (a, b), (cx, cy) in zip(LIMBS, PAF_CHANNELS):
        cand_a, cand_b = peaks[a - 1], peaks[b - 1]
        if not cand_a or not cand_b:
            out.append(None)
            continue
        scored = []
        for i, pa in enumerate(cand_a):
            for j, pb in enumerate(cand_b):
                vec = np.subtract(pb[:2], pa[:2]).astype(np.float64)
                norm = max(0.001, math.sqrt(vec[0] ** 2 + vec[1] ** 2))
                vec = vec / norm
                xs = np.round(np.linspace(pa[0], pb[0], num=10)).astype(int)
                ys = np.round(np.linspace(pa[1], pb[1], num=10)).astype(int)
                along = pafs[ys, xs, cx] * vec[0] + pafs[ys, xs, cy] * vec[1]
                prior = along.sum() / len(along) + min(0.5 * height / norm - 1, 0)
                if np.count_nonzero(along > PAF_THRESHOLD) > 0.8 * len(along) and prior > 0:
                    scored.append((i, j, prior))
        scored.sort(key=lambda s: s[2], reverse=True)
        rows = np.zeros((0, 5))
        for i, j, s in scored:
            if i not in rows[:, 3] and j not in rows[:, 4]:
                rows = np.vstack([rows, [cand_a[i][3], cand_b[j][3], s, i, j]])
                if len(rows) >= min(len(cand_a), len(cand_b)):
                    break
        out.append(rows)
    return out


def assemble(peaks: list, connections: list[np.ndarray | None]) -> tuple[np.ndarray, np.ndarray]:
    """Group limbs into people: rows of 18 candidate ids (-1 none), total score and part count; people with
    fewer than 4 parts or a mean score under 0.4 are dropped. Returns (candidates x, y, score, id; people)."""
    candidates = np.array([p for part in peaks for p in part], dtype=np.float64).reshape(-1, 4)
    people = -1 * np.ones((0, 20))
    for k, rows in enumerate(connections):
        if rows is None:
            continue
        index_a, index_b = LIMBS[k][0] - 1, LIMBS[k][1] - 1
        for i in range(len(rows)):
            part_a, part_b = rows[i, 0], rows[i, 1]
            found = [j for j in range(len(people)) if people[j][index_a] == part_a or people[j][index_b] == part_b]
            found = found[:2]
            if len(found) == 1:
                j = found[0]
                if people[j][index_b] != part_b:
                    people[j][index_b] = part_b
                    people[j][-1] += 1
                    people[j][-2] += candidates[int(part_b), 2] + rows[i, 2]
            elif len(found) == 2:
                j1, j2 = found
                membership = ((people[j1] >= 0).astype(int) + (people[j2] >= 0).astype(int))[:-2]
                if not np.any(membership == 2):  # disjoint: merge the second into the first
                    people[j1][:-2] += people[j2][:-2] + 1
                    people[j1][-2:] += people[j2][-2:]
                    people[j1][-2] += rows[i, 2]
                    people = np.delete(people, j2, 0)
                else:
                    people[j1][index_b] = part_b
                    people[j1][-1] += 1
                    people[j1][-2] += candidates[int(part_b), 2] + rows[i, 2]
            elif not found and k < 17:
                row = -1 * np.ones(20)
                row[index_a], row[index_b] = part_a, part_b
                row[-1] = 2
                row[-2] = candidates[rows[i, :2].astype(int), 2].sum() + rows[i, 2]
                people = np.vstack([people, row])
    keep = [i for i in range(len(people)) if people[i][-1] >= 4 and people[i][-2] / people[i][-1] >= 0.4]
    return candidates, people[keep]


def _found(j: int) -> bool:
    """Whether a people-row entry names a candidate (the extension tests the int-cast id against -1)."""
    return int(j) != -1


def body_keypoints(net: BodyNet, bgr: np.ndarray) -> list[list[Keypoint | None]]:
    """People's 18 keypoints in pixels of ``bgr``."""
    h, w = bgr.shape[:2]
    scale = 0.5 * BOX / h
    small = _resize(bgr, h * scale, w * scale)
    padded, ph, pw = _pad(small)
    paf_out, heat_out = _run(net, padded)
    heatmaps = _maps(heat_out, padded.shape[:2], (ph, pw), (h, w))
    pafs = _maps(paf_out, padded.shape[:2], (ph, pw), (h, w))
    peaks = find_peaks(heatmaps)
    candidates, people = assemble(peaks, _connections(peaks, pafs, h))
    return [[Keypoint(*candidates[int(j)][:3]) if _found(j) else None for j in person[:18]] for person in people]


# --- hands and face -----------------------------------------------------------------------------------------

def hand_boxes(body: list[Keypoint | None], width: int, height: int) -> list[tuple[int, int, int, bool]]:
    """Square boxes (x, y, side, is_left) around the hands, extrapolated from shoulder, elbow and wrist as
    OpenPose does; boxes under 20 px are dropped. Left (keypoints 5-7) before right (2-4)."""
    boxes = []
    for shoulder, elbow, wrist, is_left in ((5, 6, 7, True), (2, 3, 4, False)):
        s, e, r = body[shoulder], body[elbow], body[wrist]
        if s is None or e is None or r is None:
            continue
        ratio = 0.33
        x = r.x + ratio * (r.x - e.x)
        y = r.y + ratio * (r.y - e.y)
        side = 1.5 * max(math.hypot(r.x - e.x, r.y - e.y), 0.9 * math.hypot(e.x - s.x, e.y - s.y))
        x, y = max(x - side / 2, 0), max(y - side / 2, 0)
        side = min(side if x + side <= width else width - x, side if y + side <= height else height - y)
        if side >= 20:
            boxes.append((int(x), int(y), int(side), is_left))
    return boxes


def face_box(body: list[Keypoint | None], width: int, height: int) -> tuple[int, int, int] | None:
    """A square (x, y, side) around the head from the nose and the eyes/ears (Lvmin's rule), or None."""
    head, eyes, ears = body[0], (body[14], body[15]), (body[16], body[17])
    if head is None or all(k is None for k in (*eyes, *ears)):
        return None
    half = 0.0
    for points, factor in ((eyes, 3.0), (ears, 1.5)):
        for k in points:
            if k is not None:
                half = max(half, max(abs(head.x - k.x), abs(head.y - k.y)) * factor)
    x, y = max(head.x - half, 0), max(head.y - half, 0)
    side = min(half * 2 if x + half <= width else width - x, half * 2 if y + half <= height else height - y)
    return (int(x), int(y), int(side)) if side >= 20 else None


def _largest_blob_peak(raw: np.ndarray, smooth: np.ndarray, threshold: float) -> tuple[int, int] | None:
    """(row, col) of the maximum of ``raw`` inside the 8-connected region above ``threshold`` (in ``smooth``)
    whose ``raw`` values sum highest; None when nothing is above it."""
    binary = (smooth > threshold).astype(np.uint8)
    if not binary.any():
        return None
    count, labels = cv2.connectedComponents(binary, connectivity=8)
    sums = [raw[labels == i].sum() for i in range(1, count)]
    best = int(np.argmax(sums)) + 1
    masked = np.where(labels == best, raw, 0)
    row = int(masked.max(1).argmax())
    return row, int(masked[row].argmax())


def hand_keypoints(net: HandNet, crop: np.ndarray) -> np.ndarray:
    """21 (x, y) pixel positions in a square BGR crop ((0, 0): not found): heatmaps averaged over four sizes
    (184-736 px) at 128², each keypoint the peak of its strongest blob above 0.05."""
    h, w = crop.shape[:2]
    blurred = cv2.GaussianBlur(crop, (0, 0), 0.8)
    size = 128
    avg = np.zeros((size, size, 22))
    for scale in (0.5, 1.0, 1.5, 2.0):
        side = scale * BOX
        resized = _resize(blurred, side, side)
        padded, ph, pw = _pad(resized)
        avg += _maps(_run(net, padded), padded.shape[:2], (ph, pw), (size, size)) / 4
    return hand_peaks(avg, w, h)


def hand_peaks(heatmaps: np.ndarray, width: int, height: int, threshold: float = 0.05) -> np.ndarray:
    """21 (x, y) positions in a ``width``×``height`` crop from its S×S×22 averaged heatmaps: per keypoint the
    maximum inside the strongest blob of the σ-3 smoothed map above ``threshold``, scaled from S to the crop
    (truncated); (0, 0) when nothing is above it."""
    size = heatmaps.shape[0]
    out = []
    for part in range(21):
        raw = heatmaps[:, :, part]
        peak = _largest_blob_peak(raw, gaussian_filter(raw, sigma=3), threshold)
        if peak is None:
            out.append((0, 0))
            continue
        y, x = peak
        out.append((int(x * width / size), int(y * height / size)))
    return np.array(out)


def face_keypoints(net: FaceNet, crop: np.ndarray) -> np.ndarray:
    """(x, y) pixel positions in a square BGR crop: the network at 384², heatmaps resized to the crop (bilinear,
    corners aligned); a channel whose maximum is over 0.05 gives its argmax (all 71 channels, as the extension)."""
    h, w = crop.shape[:2]
    small = _resize(crop, 384, 384)
    param = next(net.parameters())
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(small.transpose(2, 0, 1))).float()[None] / 256.0 - 0.5
        heat = net(x.to(param.device, param.dtype))
        heat = F.interpolate(heat.float(), (h, w), mode="bilinear", align_corners=True)[0].cpu().numpy()
    return face_peaks(heat)


def face_peaks(heatmaps: np.ndarray, threshold: float = 0.05) -> np.ndarray:
    """(x, y) of each C×H×W heatmap's maximum where it is over ``threshold``; channels without one are left
    out (so the list can be shorter than the landmarks, as in the extension)."""
    out = []
    for part in heatmaps:
        if not (part > threshold).any():
            continue
        y, x = np.unravel_index(int(np.argmax(part)), part.shape)
        out.append((int(x), int(y)))
    return np.array(out, dtype=np.float64).reshape(-1, 2)


def _normalized(points: np.ndarray, x0: int, y0: int, width: int, height: int) -> list[Keypoint]:
    """Crop pixels to picture fractions; a 0 coordinate (not found) becomes -1, which drawing skips."""
    points = points.astype(np.float32)
    xs = np.where(points[:, 0] < 1e-6, -1, points[:, 0] + x0) / float(width)
    ys = np.where(points[:, 1] < 1e-6, -1, points[:, 1] + y0) / float(height)
    return [Keypoint(float(x), float(y)) for x, y in zip(xs, ys)]


def detect_poses(image: np.ndarray, body: BodyNet, hand: HandNet | None = None,
                 face: FaceNet | None = None) -> list[Pose]:
    """People in an RGB uint8 picture, keypoints as fractions of its size."""
    bgr = np.ascontiguousarray(image[:, :, ::-1])
    h, w = bgr.shape[:2]
    poses = []
    for person in body_keypoints(body, bgr):
        pose = Pose([Keypoint(k.x / w, k.y / h, k.score) if k is not None else None for k in person])
        if hand is not None:
            for x, y, side, is_left in hand_boxes(person, w, h):
                points = hand_keypoints(hand, bgr[y:y + side, x:x + side])
                if points.ndim == 2 and points.shape[1] == 2:
                    if is_left:
                        pose.left_hand = _normalized(points, x, y, w, h)
                    else:
                        pose.right_hand = _normalized(points, x, y, w, h)
        if face is not None:
            box = face_box(person, w, h)
            if box is not None:
                x, y, side = box
                points = face_keypoints(face, bgr[y:y + side, x:x + side])
                if len(points):
                    pose.face = _normalized(points, x, y, w, h)
        poses.append(pose)
    return poses


# --- drawing ---------------------------------------------------------------------------------------------------

BODY_COLORS = [(255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
               (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
               (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85)]
HAND_EDGES = [(0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10), (10, 11), (11, 12),
              (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20)]
STICK = 4
_EPS = 0.01


def _scale(points: list[Keypoint | None], canvas: np.ndarray) -> tuple[float, float]:
    """Keypoints all within [-1, 1] are fractions (×width, ×height); otherwise they are pixels already."""
    given = [k for k in points if k is not None]
    if given and all(abs(k.x) <= 1 and abs(k.y) <= 1 for k in given):
        return float(canvas.shape[1]), float(canvas.shape[0])
    return 1.0, 1.0


def draw_body(canvas: np.ndarray, keypoints: list[Keypoint | None]) -> np.ndarray:
    """The first 17 limbs as ellipses 8 px thick in 60 % of their colour, then each keypoint as a 4 px disc in
    its full colour (RGB)."""
    w, h = _scale(keypoints, canvas)
    for (a, b), color in zip(LIMBS[:17], BODY_COLORS):
        k1, k2 = keypoints[a - 1], keypoints[b - 1]
        if k1 is None or k2 is None:
            continue
        xs, ys = np.array([k1.x, k2.x]) * w, np.array([k1.y, k2.y]) * h
        length = math.hypot(xs[0] - xs[1], ys[0] - ys[1])
        angle = math.degrees(math.atan2(ys[0] - ys[1], xs[0] - xs[1]))
        polygon = cv2.ellipse2Poly((int(np.mean(xs)), int(np.mean(ys))), (int(length / 2), STICK), int(angle),
                                   0, 360, 1)
        cv2.fillConvexPoly(canvas, polygon, [int(c * 0.6) for c in color])
    for k, color in zip(keypoints, BODY_COLORS):
        if k is not None:
            cv2.circle(canvas, (int(k.x * w), int(k.y * h)), 4, color, thickness=-1)
    return canvas


def draw_hand(canvas: np.ndarray, keypoints: list[Keypoint | None] | None) -> np.ndarray:
    """Bones as 2 px lines coloured around the hue circle (edge i at hue i/20), then blue 4 px discs; points at
    or left of / above the picture's edge (not found) are skipped."""
    if not keypoints:
        return canvas
    w, h = _scale(keypoints, canvas)
    for i, (a, b) in enumerate(HAND_EDGES):
        k1, k2 = keypoints[a], keypoints[b]
        if k1 is None or k2 is None:
            continue
        x1, y1, x2, y2 = int(k1.x * w), int(k1.y * h), int(k2.x * w), int(k2.y * h)
        if x1 > _EPS and y1 > _EPS and x2 > _EPS and y2 > _EPS:
            color = [c * 255 for c in colorsys.hsv_to_rgb(i / float(len(HAND_EDGES)), 1.0, 1.0)]
            cv2.line(canvas, (x1, y1), (x2, y2), color, thickness=2)
    for k in keypoints:
        if k is None:
            continue
        x, y = int(k.x * w), int(k.y * h)
        if x > _EPS and y > _EPS:
            cv2.circle(canvas, (x, y), 4, (0, 0, 255), thickness=-1)
    return canvas


def draw_face(canvas: np.ndarray, keypoints: list[Keypoint | None] | None) -> np.ndarray:
    """White 3 px discs."""
    if not keypoints:
        return canvas
    w, h = _scale(keypoints, canvas)
    for k in keypoints:
        if k is None:
            continue
        x, y = int(k.x * w), int(k.y * h)
        if x > _EPS and y > _EPS:
            cv2.circle(canvas, (x, y), 3, (255, 255, 255), thickness=-1)
    return canvas


def draw_poses(poses: list[Pose], height: int, width: int, body: bool = True, hands: bool = True,
               face: bool = True) -> np.ndarray:
    """The poses on black, per person body, left hand, right hand, face (those asked for)."""
    canvas = np.zeros((height, width, 3), np.uint8)
    for pose in poses:
        if body:
            draw_body(canvas, pose.body)
        if hands:
            draw_hand(canvas, pose.left_hand)
            draw_hand(canvas, pose.right_hand)
        if face:
            draw_face(canvas, pose.face)
    return canvas

