"""The chat format (Llama 3's): how a conversation becomes text, in one place for the
tokenizer that stores it and the post-training stages that render it.

    <|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are ...<|eot_id|>
    <|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\n\nHi!<|eot_id|>

Each message is a header (its role between the header tokens, then a blank line), its
content with surrounding whitespace trimmed, and `<|eot_id|>`. `CHAT_TEMPLATE` is the
same format as a Jinja template for `tokenizer_config.json`, so
`AutoTokenizer.from_pretrained(DIR).apply_chat_template(messages)` renders exactly what
`render` does; its `{% generation %}` markers around assistant content let
`return_assistant_tokens_mask=True` find the assistant tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

BOS, START_HEADER, END_HEADER, EOT = "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
ROLES = ("system", "user", "assistant")

CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '" + START_HEADER + "' + message['role'] + '" + END_HEADER + "\\n\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] | trim + '" + EOT + "' }}{% endgeneration %}"
    "{%- else %}"
    "{{- message['content'] | trim + '" + EOT + "' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '" + START_HEADER + "assistant" + END_HEADER + "\\n\\n' }}{%- endif %}"
)


def header(role: str) -> str:
    return f"{START_HEADER}{role}{END_HEADER}\n\n"


@dataclass
class Rendered:
    """A conversation as text, with the character spans that post-training masks by."""

    text: str
    assistant: list[tuple[int, int]]  # content + <|eot_id|> of each assistant message (what SFT trains)
    headers: list[tuple[int, int]]  # every message header (format tokens)
    eots: list[tuple[int, int]]  # every <|eot_id|> (format tokens)


def render(messages: list[dict], bos: bool = True, generation_prompt: bool = False) -> Rendered:
    """`messages` ({"role", "content"} dicts, roles already checked) as CHAT_TEMPLATE
    renders them (Jinja's `trim` strips the same whitespace as str.strip())."""
    parts, assistant, headers, eots = [BOS] if bos else [], [], [], []
    at = len(BOS) if bos else 0
    for m in messages:
        h = header(m["role"])
        headers.append((at, at + len(h)))
        at += len(h)
        content = m["content"].strip()
        start = at
        at += len(content)
        eots.append((at, at + len(EOT)))
        at += len(EOT)
        if m["role"] == "assistant":
            assistant.append((start, at))
        parts += [h, content, EOT]
    if generation_prompt:
        h = header("assistant")
        headers.append((at, at + len(h)))
        parts.append(h)
    return Rendered("".join(parts), assistant, headers, eots)
