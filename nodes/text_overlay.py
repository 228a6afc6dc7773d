"""Bonsai Text Overlay: draw a caption or title onto images (IMAGE -> IMAGE)."""

from __future__ import annotations

from ..bonsai_core import overlay
from . import host


class BonsaiTextOverlay:
    CATEGORY = "Bonsai"
    DESCRIPTION = ("Draws text onto images: a bundled font, a font from models/fonts or a path; a fixed size or the "
                   "largest that fits; nine positions with a margin; alignment and word wrap; outline, drop shadow "
                   "and a translucent band. Separate captions for a batch with a line holding only ---.")
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("The images with the text drawn on, same size and batch.",)
    FUNCTION = "draw"

    @classmethod
    def INPUT_TYPES(cls):
        d = overlay.OverlayStyle()
        colour = "A colour name (white), #rrggbb or rgb(r, g, b)."
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The images to draw on."}),
                "text": ("STRING", {"multiline": True, "default": "Bonsai",
                                    "tooltip": f"The text; newlines are kept, at most {overlay.MAX_TEXT_CHARS} "
                                               "characters. A line with only --- between captions gives each "
                                               "image of a batch its own."}),
                "font": (overlay.font_names(host.font_folders()), {
                    "default": overlay.BUNDLED_FONT,
                    "tooltip": "The bundled DejaVu Sans Bold, Pillow's Aileron, or a font file in models/fonts."}),
                "size": ("INT", {"default": d.size, "min": 0, "max": overlay.MAX_SIZE,
                                 "tooltip": "Font size in pixels; 0 fits the largest size into the margins (at "
                                            "most 30% of the height)."}),
                "color": ("STRING", {"default": d.color, "tooltip": "Text colour. " + colour}),
                "position": (list(overlay.POSITIONS), {"default": d.position,
                                                       "tooltip": "Where the text block sits: corners, edges, "
                                                                  "centre."}),
                "margin": ("INT", {"default": d.margin, "min": 0, "max": 1024,
                                   "tooltip": "Pixels kept free between the text and the image's edges."}),
                "align": (list(overlay.ALIGNS), {"default": d.align,
                                                 "tooltip": "How lines of a wrapped block line up."}),
                "wrap": ("BOOLEAN", {"default": d.wrap,
                                     "tooltip": "Wrap words to the width between the margins."}),
                "outline_width": ("INT", {"default": d.outline_width, "min": 0, "max": 64,
                                          "tooltip": "Outline around each letter, in pixels (0: none)."}),
                "outline_color": ("STRING", {"default": d.outline_color, "tooltip": "Outline colour. " + colour}),
                "shadow_offset": ("INT", {"default": d.shadow_offset, "min": 0, "max": 64,
                                          "tooltip": "Drop shadow offset down-right, in pixels (0: none)."}),
                "shadow_color": ("STRING", {"default": d.shadow_color, "tooltip": "Shadow colour. " + colour}),
                "band_opacity": ("FLOAT", {"default": d.band_opacity, "min": 0.0, "max": 1.0, "step": 0.05,
                                           "tooltip": "A band across the image behind the text: 0 none, 1 opaque."}),
                "band_color": ("STRING", {"default": d.band_color, "tooltip": "Band colour. " + colour}),
            },
            "optional": {
                "font_path": ("STRING", {"default": "", "tooltip": "A .ttf/.otf file anywhere; used instead of font "
                                                                   "when not empty."}),
            },
        }

    def draw(self, images, text, font, size, color, position, margin, align, wrap, outline_width, outline_color,
             shadow_offset, shadow_color, band_opacity, band_color, font_path=""):
        style = overlay.OverlayStyle(
            font=font_path.strip() or font, size=size, color=color, outline_width=outline_width,
            outline_color=outline_color, shadow_offset=shadow_offset, shadow_color=shadow_color,
            band_opacity=band_opacity, band_color=band_color, position=position, margin=margin, align=align,
            wrap=wrap)
        return (overlay.draw_text_on_batch(images, text, style, host.font_folders()),)
