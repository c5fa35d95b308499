"""Word-level tokenizer and LLaVA-1.5-style chat template shared by the testbed and the demo model.

Both are tiny vocabularies of whole words; `tokenizers` + `PreTrainedTokenizerFast` keep them stock HF objects
that `save_pretrained` / `AutoProcessor.from_pretrained` round-trip.
"""

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast


# USER: <image> what colour is the triangle? ASSISTANT: red</s>USER: how many ... ASSISTANT: two</s>
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }} "
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image> {% elif item['type'] == 'text' %}{{ item['text'] }} {% endif %}"
    "{% endfor %}{% endif %}"
    "{% else %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}</s> "
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def word_level_tokenizer(vocab: dict, chat_template: str, model_max_length: int = 4096) -> PreTrainedTokenizerFast:
    """A word-level `tokenizers` model as a `PreTrainedTokenizerFast`: words split on spaces, `?` `:` `.` `,` `!`
    are their own tokens, hyphenated words (`top-left`) stay one token; `<image>` is a special token, so an
    expanded `<image><image>...` run splits into placeholders. `vocab` must hold `<s> </s> <unk> <pad> <image>`."""
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Split(Regex(r"[?:.,!]"), behavior="isolated"),
    ])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"}, padding_side="left", model_max_length=model_max_length,
    )
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    fast.chat_template = chat_template
    return fast
