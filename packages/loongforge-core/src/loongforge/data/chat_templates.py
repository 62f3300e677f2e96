"""Chat templates for supervised fine-tuning: built-in Jinja templates and how a config picks one.

``sft.chat_template`` is one of:

* ``tokenizer``: the tokenizer's own ``chat_template`` (from an HF tokenizer directory);
* a built-in name (:data:`BUILTIN_TEMPLATES`, e.g. ``chatml``);
* a literal Jinja template string (anything containing ``{%`` or ``{{``).

Templates are rendered by ``tokenizer.apply_chat_template`` with the usual variables
(``messages``, ``add_generation_prompt``, the tokenizer's special tokens). The assistant mask is
computed by rendering the conversation incrementally (see :mod:`loongforge.data.sft`), so any
template works as long as rendering the first ``k`` messages gives a prefix of rendering the first
``k + 1`` -- true of ChatML-style templates; templates that rewrite earlier turns (e.g. strip
reasoning from past assistant turns) are refused with a clear error.
"""

from __future__ import annotations

from loongforge.data.errors import DataError

#: ChatML (Qwen, many others): ``<|im_start|>{role}\n{content}<|im_end|>\n`` per message.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

#: A plain-text template for tokenizers without chat tokens; turns end with the EOS token. The
#: generation prompt stops before the space so that " word" tokens of the answer stay whole.
PLAIN = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n' }}"
    "{% else %}{{ 'Assistant: ' + message['content'] + eos_token + '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

BUILTIN_TEMPLATES: dict[str, str] = {"chatml": CHATML, "plain": PLAIN}


def resolve_chat_template(spec: str | None, tokenizer) -> str:
    """The Jinja source selected by ``sft.chat_template`` (see the module docstring)."""
    spec = spec or "chatml"
    if "{%" in spec or "{{" in spec:
        return spec
    if spec == "tokenizer":
        template = getattr(tokenizer, "chat_template", None)
        if isinstance(template, dict):  # several named templates: take the default one
            template = template.get("default")
        if not template:
            raise DataError(
                f"config key 'sft.chat_template'=tokenizer: tokenizer {getattr(tokenizer, 'name_or_path', '')!r} "
                f"has no chat_template; pick a built-in one ({', '.join(BUILTIN_TEMPLATES)})"
            )
        return template
    if spec not in BUILTIN_TEMPLATES:
        raise DataError(
            f"config key 'sft.chat_template': unknown template {spec!r} "
            f"(built-in: {', '.join(BUILTIN_TEMPLATES)}; or 'tokenizer', or a Jinja string)"
        )
    return BUILTIN_TEMPLATES[spec]
