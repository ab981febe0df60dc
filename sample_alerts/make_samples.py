"""Draw the sample snapshots with Pillow and write the sample alerts (canonical format).

Run: python sample_alerts/make_samples.py   (deterministic; rewrites images/ and *.json)
"""

from __future__ import annotations

import base64
import io
import json
import random
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter, ImageFont

HERE = Path(__file__).resolve().parent
W, H = 1280, 720

Box = tuple[int, int, int, int]


def font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def base(sky: tuple[int, int, int], floor: tuple[int, int, int], horizon: int = 430) -> Image.Image:
    image = Image.new("RGB", (W, H), sky)
    ImageDraw.Draw(image).rectangle((0, horizon, W, H), fill=floor)
    return image


def overlay(draw: ImageDraw.ImageDraw, camera: str, clock: str) -> None:
    """The camera's own caption: time at top left, camera name at top right."""
    draw.rectangle((0, 0, 420, 34), fill=(0, 0, 0))
    draw.text((8, 6), clock, fill=(255, 255, 255), font=font(22))
    draw.text((W - 260, 8), camera, fill=(255, 255, 255), font=font(20))


def person(
    draw: ImageDraw.ImageDraw,
    x: int,
    y: int,
    *,
    scale: float = 1.0,
    helmet: tuple[int, int, int] | None = (250, 210, 0),
    shirt: tuple[int, int, int] = (40, 80, 170),
    arms_up: bool = False,
    lean: int = 0,
) -> Box:
    """A simple figure standing at (x, y) = feet; returns its bounding box."""
    s = scale
    head_r = int(18 * s)
    top = y - int(170 * s)
    hx = x + lean
    draw.ellipse((hx - head_r, top, hx + head_r, top + 2 * head_r), fill=(225, 180, 140))
    if helmet:
        draw.chord(
            (hx - head_r - 3, top - 6, hx + head_r + 3, top + head_r + 6), 180, 360, fill=helmet
        )
    body_top = top + 2 * head_r
    body_bottom = y - int(70 * s)
    draw.polygon(
        [
            (hx - int(22 * s), body_top),
            (hx + int(22 * s), body_top),
            (x + int(20 * s), body_bottom),
            (x - int(20 * s), body_bottom),
        ],
        fill=shirt,
    )
    for side in (-1, 1):
        draw.line(
            (x + side * int(10 * s), body_bottom, x + side * int(18 * s), y),
            fill=(40, 40, 50),
            width=int(12 * s),
        )
        end = (
            (hx + side * int(40 * s), body_top - int(40 * s))
            if arms_up
            else (hx + side * int(34 * s), body_top + int(70 * s))
        )
        draw.line(
            (hx + side * int(20 * s), body_top + int(8 * s), *end), fill=shirt, width=int(10 * s)
        )
    return (x - int(45 * s), top - 8, x + int(45 * s) + abs(lean), y)


def flame(draw: ImageDraw.ImageDraw, cx: int, bottom: int, height: int, rng: random.Random) -> Box:
    for colour, shrink in (((200, 40, 0), 1.0), ((255, 120, 0), 0.75), ((255, 220, 60), 0.45)):
        h = int(height * shrink)
        w = int(height * 0.45 * shrink)
        points = [(cx - w, bottom)]
        for i in range(1, 8):
            px = cx - w + i * (2 * w) // 8
            points.append((px, bottom - int(h * rng.uniform(0.5, 1.0) * (1 - abs(i - 4) / 5))))
        points.append((cx + w, bottom))
        draw.polygon(points, fill=colour)
    return (cx - int(height * 0.45), bottom - height, cx + int(height * 0.45), bottom)


def smoke(image: Image.Image, cx: int, top: int) -> Image.Image:
    layer = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for i in range(6):
        r = 50 + 18 * i
        draw.ellipse(
            (cx - r + 20 * i, top - 80 * i - r, cx + r + 20 * i, top - 80 * i + r),
            fill=(90, 90, 90, 120),
        )
    layer = layer.filter(ImageFilter.GaussianBlur(12))
    return Image.alpha_composite(image.convert("RGBA"), layer).convert("RGB")


def pallets(draw: ImageDraw.ImageDraw, x: int, y: int, n: int) -> None:
    for i in range(n):
        draw.rectangle(
            (x, y - 30 * (i + 1), x + 220, y - 30 * i - 4),
            fill=(160, 120, 70),
            outline=(110, 80, 40),
            width=3,
        )


def cartons(draw: ImageDraw.ImageDraw, x: int, y: int, cols: int, rows: int) -> Box:
    for c in range(cols):
        for r in range(rows):
            draw.rectangle(
                (x + 90 * c, y - 70 * (r + 1), x + 90 * c + 86, y - 70 * r - 2),
                fill=(190, 150, 100),
                outline=(120, 90, 50),
                width=3,
            )
    return (x, y - 70 * rows, x + 90 * cols, y)


def scene_fire_open_flame(rng: random.Random) -> tuple[Image.Image, list[Box]]:
    image = base((150, 170, 190), (110, 105, 95))
    draw = ImageDraw.Draw(image)
    pallets(draw, 500, 560, 4)
    fire = flame(draw, 610, 450, 260, rng)
    image = smoke(image, 640, 200)
    return image, [fire]


def scene_fire_lamp_glare(rng: random.Random) -> tuple[Image.Image, list[Box]]:
    image = base((70, 70, 80), (95, 95, 100), horizon=470)
    layer = Image.new("RGBA", image.size, (0, 0, 0, 0))
    glow = ImageDraw.Draw(layer)
    for r, alpha in ((220, 40), (150, 70), (90, 120)):
        glow.ellipse((640 - r, 150 - r, 640 + r, 150 + r), fill=(255, 190, 90, alpha))
    image = Image.alpha_composite(image.convert("RGBA"), layer.filter(ImageFilter.GaussianBlur(25)))
    image = image.convert("RGB")
    draw = ImageDraw.Draw(image)
    draw.line((640, 0, 640, 95), fill=(30, 30, 30), width=6)
    draw.polygon([(580, 95), (700, 95), (670, 130), (610, 130)], fill=(40, 40, 45))
    draw.ellipse((615, 120, 665, 170), fill=(255, 230, 150))
    for x in (150, 900):
        draw.rectangle((x, 330, x + 220, 470), fill=(60, 90, 110))
    return image, [(590, 95, 690, 200)]


def scene_no_helmet(
    rng: random.Random, *, helmet: tuple[int, int, int] | None
) -> tuple[Image.Image, list[Box]]:
    image = base((170, 200, 230), (150, 130, 100))
    draw = ImageDraw.Draw(image)
    draw.rectangle((850, 200, 1200, 430), fill=(180, 180, 175))
    for x in range(850, 1201, 50):
        draw.line((x, 200, x, 430), fill=(120, 120, 120), width=3)
    person(draw, 250, 600, scale=1.1)
    target = person(draw, 560, 640, scale=1.3, helmet=helmet, shirt=(230, 120, 30))
    person(draw, 980, 600, scale=1.0)
    head = (target[0] + 20, target[1], target[2] - 20, target[1] + 90)
    return image, [head]


def scene_forklift_overheight(rng: random.Random) -> tuple[Image.Image, list[Box]]:
    image = base((200, 200, 195), (120, 120, 115), horizon=500)
    draw = ImageDraw.Draw(image)
    draw.line((0, 230, W, 230), fill=(220, 30, 30), width=5)
    draw.text((20, 200), "MAX LOAD HEIGHT", fill=(220, 30, 30), font=font(22))
    draw.rectangle((420, 420, 700, 620), fill=(240, 180, 0))
    draw.rectangle((600, 330, 700, 420), outline=(40, 40, 40), width=6)
    draw.ellipse((440, 580, 520, 660), fill=(30, 30, 30))
    draw.ellipse((610, 580, 690, 660), fill=(30, 30, 30))
    draw.rectangle((390, 240, 410, 640), fill=(60, 60, 60))
    draw.rectangle((250, 600, 410, 615), fill=(60, 60, 60))
    load = cartons(draw, 210, 600, 2, 6)
    return image, [(load[0], load[1], 420, 640)]


def scene_fighting(rng: random.Random) -> tuple[Image.Image, list[Box]]:
    image = base((200, 200, 190), (150, 150, 140), horizon=420)
    draw = ImageDraw.Draw(image)
    draw.polygon([(0, 0), (300, 250), (300, 420), (0, 720)], fill=(170, 170, 160))
    draw.polygon([(W, 0), (980, 250), (980, 420), (W, 720)], fill=(170, 170, 160))
    a = person(draw, 560, 620, scale=1.3, helmet=None, shirt=(150, 30, 30), arms_up=True, lean=25)
    b = person(draw, 700, 620, scale=1.3, helmet=None, shirt=(30, 110, 60), arms_up=True, lean=-25)
    return image, [(a[0], a[1], b[2], b[3])]


def scene_leaning_on_goods(rng: random.Random) -> tuple[Image.Image, list[Box]]:
    image = base((185, 185, 180), (125, 120, 110))
    draw = ImageDraw.Draw(image)
    stack = cartons(draw, 600, 640, 4, 5)
    body = person(draw, 520, 640, scale=1.3, shirt=(60, 60, 160), lean=60)
    draw.line((580, 420, 620, 380), fill=(60, 60, 160), width=12)
    return image, [(body[0], min(body[1], stack[1]), stack[0] + 120, body[3])]


def scene_electrical_no_workwear(rng: random.Random) -> tuple[Image.Image, list[Box]]:
    image = base((190, 195, 200), (110, 115, 120), horizon=520)
    draw = ImageDraw.Draw(image)
    draw.rectangle((760, 120, 1080, 600), fill=(200, 200, 205), outline=(90, 90, 90), width=5)
    draw.rectangle((780, 140, 1060, 580), fill=(60, 60, 70))
    for row in range(5):
        for col in range(6):
            colour = (220, 40, 40) if (row + col) % 3 == 0 else (230, 230, 230)
            draw.rectangle(
                (800 + 42 * col, 170 + 80 * row, 830 + 42 * col, 220 + 80 * row), fill=colour
            )
    draw.text((790, 90), "DANGER 10 kV", fill=(220, 180, 0), font=font(26))
    worker = person(draw, 620, 660, scale=1.4, helmet=(250, 250, 250), shirt=(200, 170, 140))
    draw.line((660, 400, 790, 330), fill=(250, 210, 0), width=8)
    return image, [worker]


def scene_people_extraction(rng: random.Random) -> tuple[Image.Image, list[Box]]:
    image = base((175, 180, 185), (135, 130, 120))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 120, W, 160), fill=(90, 90, 95))
    for x in (120, 480, 840):
        draw.rectangle((x, 160, x + 300, 430), fill=(80, 80, 85), outline=(40, 40, 40), width=4)
    boxes = [
        person(draw, x, 640, scale=1.1, shirt=shirt)
        for x, shirt in (
            (260, (40, 80, 170)),
            (470, (230, 120, 30)),
            (690, (40, 80, 170)),
            (930, (60, 140, 60)),
        )
    ]
    cartons(draw, 1000, 650, 2, 2)
    return image, [
        (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), 650)
    ]


Scene = Callable[[random.Random], tuple[Image.Image, list[Box]]]

SAMPLES: list[tuple[str, Scene, dict]] = [
    (
        "01_fire_open_flame",
        scene_fire_open_flame,
        {
            "box_id": "box-a1",
            "camera_id": "cam-07-yard",
            "event_type": "fire",
            "score": 0.81,
            "label": "real",
            "extra": {"zone": "pallet yard", "box_model": "yolov8n-fire"},
        },
    ),
    (
        "02_fire_lamp_glare",
        scene_fire_lamp_glare,
        {
            "box_id": "box-a1",
            "camera_id": "cam-02-workshop",
            "event_type": "fire",
            "score": 0.64,
            "label": "false",
            "extra": {"zone": "workshop 2", "box_model": "yolov8n-fire"},
        },
    ),
    (
        "03_no_helmet",
        lambda rng: scene_no_helmet(rng, helmet=None),
        {
            "box_id": "box-b2",
            "camera_id": "cam-11-site",
            "event_type": "no_helmet",
            "score": 0.77,
            "label": "real",
            "extra": {"zone": "construction east", "box_model": "helmet-v3"},
        },
    ),
    (
        "04_forklift_overheight",
        scene_forklift_overheight,
        {
            "box_id": "box-c3",
            "camera_id": "cam-05-dock",
            "event_type": "forklift_overheight",
            "score": 0.58,
            "label": "real",
            "extra": {"zone": "dock 5", "box_model": "forklift-load-v1"},
        },
    ),
    (
        "05_fighting",
        scene_fighting,
        {
            "box_id": "box-d4",
            "camera_id": "cam-09-corridor",
            "event_type": "fighting",
            "score": 0.52,
            "label": "real",
            "extra": {"zone": "corridor B", "box_model": "action-v2"},
        },
    ),
    (
        "06_leaning_on_goods",
        scene_leaning_on_goods,
        {
            "box_id": "box-c3",
            "camera_id": "cam-03-warehouse",
            "event_type": "leaning_on_goods",
            "score": 0.61,
            "label": "real",
            "extra": {"zone": "warehouse B", "box_model": "pose-v2"},
        },
    ),
    (
        "07_electrical_no_workwear",
        scene_electrical_no_workwear,
        {
            "box_id": "box-e5",
            "camera_id": "cam-12-substation",
            "event_type": "no_workwear",
            "score": 0.69,
            "label": "real",
            "extra": {"zone": "substation 2", "box_model": "ppe-v4"},
        },
    ),
    (
        "08_people_extraction",
        scene_people_extraction,
        {
            "box_id": "box-c3",
            "camera_id": "cam-06-loading-bay",
            "event_type": "people_gathering",
            "score": 0.88,
            "label": "real",
            "extra": {"zone": "loading bay", "box_model": "person-v5"},
        },
    ),
    (
        "09_no_helmet_false",
        lambda rng: scene_no_helmet(rng, helmet=(250, 250, 250)),
        {
            "box_id": "box-b2",
            "camera_id": "cam-11-site",
            "event_type": "no_helmet",
            "score": 0.55,
            "label": "false",
            "extra": {"zone": "construction east", "box_model": "helmet-v3"},
        },
    ),
]


def main() -> None:
    (HERE / "images").mkdir(exist_ok=True)
    for number, (name, draw_scene, fields) in enumerate(SAMPLES, start=1):
        image, boxes = draw_scene(random.Random(number))
        minute = f"14:{number:02d}:12"
        overlay(ImageDraw.Draw(image), fields["camera_id"], f"2026-11-20 {minute}")
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=85)
        jpeg = buffer.getvalue()
        (HERE / "images" / f"{name}.jpg").write_bytes(jpeg)
        label = fields["event_type"]
        alert = {
            "alert_id": f"sample-{number:04d}",
            "box_id": fields["box_id"],
            "camera_id": fields["camera_id"],
            "event_type": fields["event_type"],
            "occurred_at": f"2026-11-20T{minute}+08:00",
            "score": fields["score"],
            "boxes": [
                {
                    "x1": b[0],
                    "y1": b[1],
                    "x2": b[2],
                    "y2": b[3],
                    "label": label,
                    "score": fields["score"],
                }
                for b in boxes
            ],
            "site": "plant-north",
            "extra": fields["extra"],
            "label": fields["label"],
            "image": base64.b64encode(jpeg).decode(),
        }
        (HERE / f"{name}.json").write_text(json.dumps(alert, indent=1) + "\n", encoding="utf-8")
        print(f"{name}: {len(jpeg)} bytes")


if __name__ == "__main__":
    main()
