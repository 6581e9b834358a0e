"""The evidence a person looks at: one picture per photo and an ``index.html`` of them all.

A picture (:func:`evidence_picture`) is a caption band, then one row per shown reference: the
photo on the left, the reference on the right, both scaled to :data:`ROW_HEIGHT` pixels, and a
line between the two ends of each verified inlier match (the points RANSAC kept; at most
:data:`MAX_LINES` per reference, so a strong match stays readable). The caption
gives the answer (landmark id, score, classifier confidence, inliers); each row's label gives
the reference's id, its landmark and its inlier count. A photo without any verified match is
shown beside its answer's first reference (the nearest one for kNN), without lines. Pure
functions: arrays and answers in, RGB arrays or text out.
"""

from __future__ import annotations

import html
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ROW_HEIGHT = 256  # pixels of each photo / reference row
MAX_ROWS = 3  # references shown per photo
MAX_LINES = 60  # matches drawn per reference (the strongest evidence does not need more)
GAP = 8  # pixels between the photo and the reference
CAPTION_LINE = 18  # pixels per caption line
_LINE_COLOURS = ((255, 64, 64), (64, 200, 255), (255, 210, 0), (120, 255, 120), (255, 120, 255))


def _font(size: int = 14):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def _scaled(image: np.ndarray, height: int) -> tuple[Image.Image, float]:
    """The image at ``height`` pixels (aspect kept) and the scale applied."""
    scale = height / image.shape[0]
    width = max(1, round(image.shape[1] * scale))
    return Image.fromarray(image).resize((width, height), Image.BILINEAR), scale


def decisive_text(candidate, digits: int = 3) -> str:
    """The score that decides the answer, or ``-`` for a candidate that cannot be the answer
    (beyond ``--rerank_top``)."""
    return "-" if candidate.decisive is None else f"{candidate.decisive:.{digits}f}"


def stronger_beyond(answer) -> list:
    """The listed candidates that cannot be the answer (beyond ``--rerank_top``) but have more
    inliers than the answer."""
    if not answer.candidates:
        return []
    first = answer.candidates[0]
    return [c for c in answer.candidates[1:] if not c.eligible and c.inliers > first.inliers]


def format_candidate(candidate) -> str:
    confidence = ("n/a" if candidate.classifier_share is None
                  else f"{candidate.classifier_share:.2f}")
    return (f"landmark {candidate.landmark_id}: score {candidate.score:.3f}, classifier "
            f"{confidence}, {candidate.inliers} inliers")


def caption_lines(answer) -> list[str]:
    """The picture's caption: the photo, its answer, the other candidates."""
    lines = [f"{answer.photo}"]
    if not answer.candidates or answer.row is None or answer.row.label is None:
        status = answer.row.status if answer.row is not None else answer.scored.status
        lines.append(f"no answer ({status})")
        return lines
    lines.append("answer: " + format_candidate(answer.candidates[0]))
    others = "; ".join(f"{c.landmark_id} ({decisive_text(c, 2)}, {c.inliers} inl.)"
                       for c in answer.candidates[1:])
    if others:
        lines.append("then: " + others)
    return lines


def shown_references(answer, max_rows: int = MAX_ROWS) -> list:
    """The references to draw (those with kept matches): the answer's best ones, and the
    strongest reference of any other candidate when it has more inliers than the answer's
    best (the evidence against the answer is shown too), in at most ``max_rows`` rows; with
    no match at all, the answer's first reference."""
    with_matches = [[e for e in candidate.evidence if len(e.photo_points)]
                    for candidate in answer.candidates]
    if not with_matches:
        return []
    answer_best = with_matches[0]
    others = sorted((e for rows in with_matches[1:] for e in rows[:1]),
                    key=lambda e: (-e.inliers, e.reference_id))
    challenger = [others[0]] if others and (
        not answer_best or others[0].inliers > answer_best[0].inliers) else []
    shown = answer_best[: max_rows - len(challenger)] + challenger
    if not shown and answer.candidates and answer.candidates[0].evidence:
        # Nothing verified: the answer's first reference (its nearest neighbour for kNN),
        # without lines, so the reader still sees what the photo was taken for.
        shown = [answer.candidates[0].evidence[0]]
    return shown


def evidence_picture(answer, reference_image: Callable[[str], Optional[np.ndarray]],
                     row_height: int = ROW_HEIGHT) -> np.ndarray:
    """One photo's picture, uint8 ``[H, W, 3]`` (see the module docstring).

    ``reference_image(reference_id)``: the reference's pixels (the ones its features were
    computed on), or None when it cannot be read (its row then says so).
    """
    font = _font()
    photo, photo_scale = _scaled(answer.image, row_height)
    rows = []
    for evidence in shown_references(answer):
        pixels = reference_image(evidence.reference_id)
        rows.append((evidence, None if pixels is None else _scaled(pixels, row_height)))
    caption = caption_lines(answer)
    widest_reference = max((item[1][0].width for item in rows if item[1] is not None),
                           default=0)
    width = max(photo.width + GAP + widest_reference, 520)
    label_height = CAPTION_LINE + 4
    height = (len(caption) * CAPTION_LINE + 8
              + max(len(rows), 1) * (row_height + label_height))
    canvas = Image.new("RGB", (width, height), (24, 24, 24))
    draw = ImageDraw.Draw(canvas)
    for number, line in enumerate(caption):
        draw.text((6, 4 + number * CAPTION_LINE), line, fill=(255, 255, 255), font=font)
    top = len(caption) * CAPTION_LINE + 8
    if not rows:
        canvas.paste(photo, (0, top + label_height))
        draw.text((6, top + 2), "no verified reference to show", fill=(255, 180, 180),
                  font=font)
    for number, (evidence, scaled) in enumerate(rows):
        row_top = top + number * (row_height + label_height)
        draw.text((6, row_top + 2),
                  f"reference {evidence.reference_id} (landmark {evidence.landmark_id}): "
                  f"{evidence.inliers} inliers", fill=(230, 230, 230), font=font)
        image_top = row_top + label_height
        canvas.paste(photo, (0, image_top))
        if scaled is None:
            draw.text((photo.width + GAP, image_top + 4), "reference image unavailable",
                      fill=(255, 180, 180), font=font)
            continue
        reference, reference_scale = scaled
        left = photo.width + GAP
        canvas.paste(reference, (left, image_top))
        colour = _LINE_COLOURS[number % len(_LINE_COLOURS)]
        for (y1, x1), (y2, x2) in list(zip(evidence.photo_points,
                                           evidence.reference_points))[:MAX_LINES]:
            start = (x1 * photo_scale, image_top + y1 * photo_scale)
            end = (left + x2 * reference_scale, image_top + y2 * reference_scale)
            draw.line([start, end], fill=colour, width=1)
            for x, y in (start, end):
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], outline=colour)
    return np.asarray(canvas)


def index_html(answers: Sequence, pictures: Sequence[Optional[str]], failures: Sequence,
               title: str) -> str:
    """A page with every photo's picture and its candidates table, then the photos that could
    not be answered. ``pictures``: each answer's picture path relative to the page."""
    escape = html.escape
    parts = [
        "<!DOCTYPE html>", "<html><head><meta charset='utf-8'>",
        f"<title>{escape(title)}</title>",
        "<style>body{font-family:sans-serif;background:#fafafa;margin:2em}"
        "table{border-collapse:collapse;margin:.5em 0 2em}td,th{border:1px solid #ccc;"
        "padding:2px 8px;text-align:right}td:first-child,th:first-child{text-align:left}"
        "img{max-width:100%;border:1px solid #999}.bad{color:#a00}</style>",
        "</head><body>", f"<h1>{escape(title)}</h1>",
    ]
    for answer, picture in zip(answers, pictures):
        parts.append(f"<h2>{escape(answer.photo)}</h2>")
        if picture:
            parts.append(f"<img src='{escape(picture)}' alt='evidence for "
                         f"{escape(answer.photo)}'>")
        parts.append("<table><tr><th>landmark</th><th>score</th><th>classifier</th>"
                     "<th>inliers</th><th>best references (inliers)</th></tr>")
        for candidate in answer.candidates:
            share = ("n/a" if candidate.classifier_share is None
                     else f"{candidate.classifier_share:.3f}")
            best = ", ".join(f"{escape(e.reference_id)} ({e.inliers})"
                             for e in candidate.evidence[:3])
            parts.append(f"<tr><td>{candidate.landmark_id}</td><td>{decisive_text(candidate)}</td>"
                         f"<td>{share}</td><td>{candidate.inliers}</td><td>{best}</td></tr>")
        parts.append("</table>")
    if failures:
        parts.append("<h2 class='bad'>Not answered</h2><ul>")
        for photo, reason in failures:
            parts.append(f"<li class='bad'>{escape(photo)}: {escape(reason)}</li>")
        parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
