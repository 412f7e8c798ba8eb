"""Offline word-level tokenizer and LLaVA processor for the toy models (no hub access needed)."""
from __future__ import annotations

import re

from .shapes import COLORS, NUMBERS, SHAPES, SIZES, plural

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
IMAGE_TOKEN = "<image>"
# The toy models put the question before the image ("USER: question <image> ASSISTANT:"): image tokens can
# then attend to the question and flag a match, which the answer position only has to detect.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %} <image>{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}</s>{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
_TEXT = """
user assistant is there a an the in image are on left right of number written please answer yes no
question using single word or phrase what how many color shape which side top bottom it this
same different than more fewer empty describe
select best following multiple choice based video respond with only letter option from given choices directly
first appear appears moves moving move up down does change changes changed object objects order after before
frame frames end start stays still appeared disappeared disappears
"""


def vocabulary() -> list[str]:
    words = set(re.findall(r"\w+|[^\w\s]", _TEXT.lower()))
    words |= set(SHAPES) | {plural(s) for s in SHAPES} | set(COLORS) | set(NUMBERS) | set(SIZES)
    words |= set("0123456789") | set("abcdefgh") | set(".,?:;!()'\"-")
    return SPECIALS + sorted(words)


def build_tokenizer():
    """A lower-casing word-level ``PreTrainedTokenizerFast`` with ``<image>`` as a special token."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        padding_side="left",
    )
    fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return fast


def build_llava_processor(image_size: int, patch_size: int):
    """A ``LlavaProcessor`` (CLIP image processing, ``(image_size/patch_size)^2`` image tokens) for the toy models."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        do_center_crop=True, do_resize=True,
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=build_tokenizer(), patch_size=patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )


def build_llava_next_processor(crop: int, patch_size: int, pinpoints: list[list[int]]):
    """A ``LlavaNextProcessor`` for the toy AnyRes model: a ``crop``-px thumbnail plus crops of ``crop`` px tiling the
    best of ``pinpoints`` (the toy LLaVA's CLIP image processing per view)."""
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    base = build_llava_processor(crop, patch_size)
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop}, image_grid_pinpoints=pinpoints,
        image_mean=base.image_processor.image_mean, image_std=base.image_processor.image_std,
    )
    return LlavaNextProcessor(
        image_processor=image_processor, tokenizer=base.tokenizer, patch_size=patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )


QWEN_SPECIALS = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
QWEN_CHAT_TEMPLATE = (  # question first, like the toy LLaVA template (see CHAT_TEMPLATE)
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %} <|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'video' %} <|vision_start|><|video_pad|><|vision_end|>{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}</s>{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_qwen_processor(image_size: int, patch_size: int = 4, merge_size: int = 2):
    """A ``Qwen2VLProcessor`` for the toy Qwen2-VL: ``image_size`` square images -> (image_size/patch/merge)^2
    tokens."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN] + QWEN_SPECIALS})
    pixels = image_size * image_size
    image_processor = Qwen2VLImageProcessor(patch_size=patch_size, merge_size=merge_size, temporal_patch_size=2,
                                            min_pixels=pixels, max_pixels=pixels)
    video_processor = Qwen2VLVideoProcessor(patch_size=patch_size, merge_size=merge_size, temporal_patch_size=2,
                                            min_pixels=pixels, max_pixels=pixels, cap_pixels_per_frame=True)
    return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tok, video_processor=video_processor,
                            chat_template=QWEN_CHAT_TEMPLATE)


VIDEO_TOKEN = "<video>"
LETTERS = "ABCD"  # answer letters for Video-MME-style questions (the word-level vocabulary is lower-cased)
OV_CHAT_TEMPLATE = CHAT_TEMPLATE.replace(  # a video first (as OneVision prompts it), an image after the question
    "USER: ", "USER:{% for c in message['content'] %}{% if c['type'] == 'video' %} <video>{% endif %}{% endfor %} ")


def build_llava_onevision_processor(crop: int, patch_size: int, pinpoints: list[list[int]]):
    """A ``LlavaOnevisionProcessor`` for the toy video model: the toy LLaVA's tokenizer plus ``<video>`` and upper-case
    ``A``-``D`` tokens (so replies parse with Video-MME's letter rules), ``crop``-px frames pooled 2x2 by the model,
    images as AnyRes views over ``pinpoints`` like the toy LLaVA-NeXT."""
    from tokenizers import AddedToken
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

    tok = build_tokenizer()  # existing ids unchanged: the new tokens are appended
    tok.add_tokens([AddedToken(letter, single_word=True, normalized=False) for letter in LETTERS])
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN, VIDEO_TOKEN]})
    base = build_llava_processor(crop, patch_size).image_processor
    square = {"height": crop, "width": crop}
    image_processor = LlavaOnevisionImageProcessor(size=square, image_grid_pinpoints=pinpoints,
                                                   image_mean=base.image_mean, image_std=base.image_std)
    video_processor = LlavaOnevisionVideoProcessor(size=square, image_mean=base.image_mean, image_std=base.image_std)
    return LlavaOnevisionProcessor(
        image_processor=image_processor, tokenizer=tok, video_processor=video_processor,
        num_image_tokens=(crop // patch_size) ** 2, vision_feature_select_strategy="default",
        chat_template=OV_CHAT_TEMPLATE, image_token=IMAGE_TOKEN, video_token=VIDEO_TOKEN,
    )
