// prompt_filter.h: turns a small teacher model's reply to a request for a prompt ("Write one question someone might
// ask about cooking. Reply with the question only.") into the user prompt it holds, or drops it. The rules and why
// they are what they are: the comment at the top of prompt_filter.c.
#pragma once

// Returns 1 and sets *out to the cleaned prompt (malloc'd; the caller frees it), or 0 with *out = NULL: the reply is
// dropped. *why (when why is not NULL) is then a short static reason: "empty", "no letter", "too short", "too long",
// "assistant offer", "refusal" or "not a prompt"; NULL when the prompt is kept. A NULL text counts as empty.
// Pure (no I/O, no state). UTF-8 safe: the text is cut only at ASCII bytes or around a whole curly quote, so every
// multi-byte sequence comes through whole; bytes >= 0x80 count as letters.
int prompt_filter(const char *text, char **out, const char **why);
