// chat.h: chat templates of the teacher families, rendered straight to token ids with an assistant-only
// loss mask (1 on assistant content and its end-of-turn token, 0 on headers, system and user turns).
//
// CHAT_CHATML (SmolLM2):  <|im_start|>ROLE\nCONTENT<|im_end|>\n   per message; a default system turn
//                         ("You are a helpful AI assistant named SmolLM, trained by Hugging Face") is
//                         inserted when the first message is not a system message, as the GGUF template does.
// CHAT_LLAMA3:            <|begin_of_text|> then <|start_header_id|>ROLE<|end_header_id|>\n\nCONTENT<|eot_id|>
// add_generation_prompt appends the assistant header ("<|im_start|>assistant\n" /
// "<|start_header_id|>assistant<|end_header_id|>\n\n").
#pragma once
#include <stdbool.h>
#include <stdint.h>

#include "distill/common.h"
#include "distill/tokenizer.h"

typedef struct {
    const char *role;     // "system" | "user" | "assistant" (other roles are rendered as given)
    const char *content;  // UTF-8
} ChatMessage;

typedef enum { CHAT_CHATML = 0, CHAT_LLAMA3 = 1 } ChatFamily;

// Chooses the family from the tokenizer's chat template (GGUF tokenizer.chat_template) or, without one,
// from its special tokens / pre-tokenizer. Returns -1 with e filled if neither family fits.
int chat_family_for(const Tokenizer *t, ChatFamily *fam, DlError *e);
const char *chat_family_name(ChatFamily f);
int chat_family_from_name(const char *name);  // "chatml" | "llama3", else -1

// Renders msgs to ids; *loss_mask (may pass NULL to skip) has one byte per id. Content is encoded without
// matching special tokens, so a user cannot inject "<|im_end|>". Returns -1 (e filled) if the tokenizer
// lacks the family's special tokens or content is not valid UTF-8.
int chat_render(const Tokenizer *t, ChatFamily fam, const ChatMessage *msgs, int n, bool add_generation_prompt,
                int32_t **ids, uint8_t **loss_mask, int64_t *n_ids, DlError *e);
