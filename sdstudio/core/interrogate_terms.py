"""Words the CLIP interrogator ranks an image against, by category, with how many of each it adds to
the caption (our own lists of common terms: picture media, art movements and descriptive "flavours")."""

from __future__ import annotations

MEDIUMS = (
    "a photograph", "a black and white photograph", "a polaroid photo", "an oil painting", "a watercolor painting",
    "an acrylic painting", "a digital painting", "a pencil drawing", "a charcoal drawing", "an ink drawing",
    "a pastel drawing", "a sketch", "a 3D render", "pixel art", "an illustration", "a comic book panel",
    "a manga drawing", "a vector illustration", "a poster", "a woodcut print", "a mosaic", "a stained glass window",
    "a sculpture", "a screenshot", "a collage", "a tattoo design", "an infographic", "a low poly render",
)

MOVEMENTS = (
    "impressionism", "post-impressionism", "expressionism", "cubism", "surrealism", "art nouveau", "art deco",
    "pop art", "minimalism", "baroque", "rococo", "renaissance", "romanticism", "realism", "photorealism",
    "hyperrealism", "abstract art", "futurism", "bauhaus", "ukiyo-e", "pointillism", "fauvism", "dada",
    "constructivism", "op art", "street art", "vaporwave", "cyberpunk", "steampunk", "brutalism",
)

FLAVORS = (
    "highly detailed", "sharp focus", "soft focus", "soft lighting", "dramatic lighting", "studio lighting",
    "natural light", "golden hour", "backlit", "high contrast", "low contrast", "vibrant colors", "muted colors",
    "pastel colors", "monochrome", "colorful", "dark", "bright", "moody", "cinematic", "bokeh", "depth of field",
    "wide angle", "close up", "symmetrical", "geometric", "minimalist", "intricate", "ornate", "textured",
    "smooth", "glossy", "matte", "grainy", "film grain", "hdr", "4k", "8k", "concept art", "matte painting",
    "flat colors", "clean lines", "simple background", "white background", "black background", "outdoors",
    "indoors", "night", "daylight", "foggy", "rainy", "sunny", "warm colors", "cool colors", "high saturation",
    "retro", "vintage", "futuristic", "whimsical", "serene", "chaotic", "elegant", "cute", "eerie",
)

# (name, how many of the best matches go into the caption, terms)
CATEGORIES: tuple[tuple[str, int, tuple[str, ...]], ...] = (
    ("medium", 1, MEDIUMS),
    ("movement", 1, MOVEMENTS),
    ("flavor", 3, FLAVORS),
)
