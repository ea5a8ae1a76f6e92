// prompt_filter.c: a teacher's reply to a request for a prompt, cleaned into that prompt or dropped
// (prompt_filter.h).
//
// Asked "Write one question someone might ask about cooking. Reply with the question only.", a small instruct model
// (SmolLM2-135M) seldom replies with the question only. It wraps it in a preamble (Here's a question someone might
// ask about astronomy: "What's the biggest planet?"), opens with "Sure!", puts a label in front ("Question: ..."),
// or writes no prompt at all and offers its help instead ("I'm ready to assist. What question would you like me to
// help with?"). The rules, in the order they run:
//
//  1. Trim whitespace. Nothing left: "empty".
//  2. Quoted prompt. The longest span inside straight "..." or curly “...” quotes (either closing quote ends a span)
//     that holds at least 4 words becomes the text, trimmed, when what lies outside it is a preamble: it has no
//     letter, or it holds a cue (k_cues, k_openers: "question", "request", "here's a", "sure", "could be", ...).
//     Why both conditions: a shorter span is quoted words inside a prompt (What does "carpe diem" mean in daily
//     life?), and a prompt may quote a whole sentence itself (Translate "Where is the train station?" into French.):
//     what lies outside is then an instruction with no cue, and the prompt stays whole.
//  3. Offers and refusals: a phrase of k_markers anywhere in the text (the quoted span, else the whole reply,
//     lead-ins included), case-insensitive, as whole words; a ' in a phrase matches the straight and the curly
//     apostrophe. An offer to help ("ready to assist", "what would you like", "i'd be happy to"): "assistant offer";
//     a refusal ("i'm sorry", "i'm unable to", "i can't help"): "refusal"; talk about itself or an answer ("as an
//     ai language model", "here's the answer"): "not a prompt". Bare "i can't", "i cannot" and "let me know if" are
//     not in the table, only the assistant's longer forms of them: users write them too ("I can't get my bread to
//     rise, what am I doing wrong?", "let me know if my plan is realistic"). What lies outside a quoted prompt is
//     not searched: "Here's one: \"...\" Let me know if you'd like another!" holds a good prompt.
//  4. Lead-ins, stripped from the front one after another (at most MAX_LEADS), each only when more text follows:
//     a. a first line that ends in ':' and holds a cue, at most MAX_LEAD_WORDS words ("Sure! Here is a request:");
//     b. an interjection followed by , . ! or : ("Sure!", "Sure,", "Certainly!", "Of course!", "Okay,");
//     c. a first clause (up to the first ':', '.' or '!' before a space, or the end of the line) of at most
//        MAX_LEAD_WORDS words that ends in ':' and holds a cue, which covers the labels "Question:", "Request:",
//        "Task:", "Prompt:" (any case) and "Here's a question about gardening: How ...?", or that starts with an
//        opener ("Here's one. How ...?").
//     Only a lead-in with a cue goes: "Summarize the following paragraph:\n..." is a task, not a preamble, and what
//     follows its colon is no prompt on its own. The openers are not a bare "here is": "Here is my plan for the
//     week, is it realistic: ..." is a user's prompt.
//  5. Whitespace: every line loses its trailing whitespace (a "\r" of "\r\n" too); runs of blank lines become one.
//  6. What is left must look like a prompt: a letter in it, else "no letter"; not a lead-in with nothing after it
//     (ends in ':' and holds a cue: the reply stopped there, e.g. at the token limit), else "not a prompt"; at least
//     4 words, else "too short" (a topic or a fragment, not a request); at most 200, else "too long" (an answer or a
//     ramble). A word is a run of non-space bytes with a letter or a digit in it.
//
// UTF-8: bytes >= 0x80 count as letters (so "préparer" is one word and "日本" has a letter), are never case-folded,
// and are never cut apart: every cut is at an ASCII byte or around a whole 3-byte curly quote.
#include "distill/prompt_filter.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "distill/common.h"

enum { MIN_WORDS = 4, MAX_WORDS = 200, MAX_LEAD_WORDS = 20, MAX_LEADS = 8 };

#define N_OF(a) (sizeof(a) / sizeof((a)[0]))

static const char k_offer[] = "assistant offer", k_refusal[] = "refusal", k_meta[] = "not a prompt";

// Phrases that show the reply is no prompt (rule 3), lowercase; ' matches ' and ’, a space any one whitespace byte.
static const struct {
    const char *phrase, *why;
} k_markers[] = {
    {"ready to assist", k_offer},
    {"ready to help", k_offer},
    {"ready to answer", k_offer},
    {"how can i help", k_offer},
    {"how can i assist", k_offer},
    {"how may i help", k_offer},
    {"how may i assist", k_offer},
    {"what can i help", k_offer},
    {"what can i do for you", k_offer},
    {"what question would you like", k_offer},
    {"what would you like", k_offer},
    {"what's your question", k_offer},
    {"what is your question", k_offer},
    {"i'd be happy to", k_offer},
    {"i would be happy to", k_offer},
    {"i'd be glad to", k_offer},
    {"i would be glad to", k_offer},
    {"happy to help", k_offer},
    {"glad to help", k_offer},
    {"i'm here to help", k_offer},
    {"i am here to help", k_offer},
    {"feel free to ask", k_offer},
    {"let me know if you need", k_offer},
    {"let me know if you'd like", k_offer},
    {"let me know if you would like", k_offer},
    {"let me know if you have", k_offer},
    {"is there anything else", k_offer},
    {"if you have any questions", k_offer},
    {"i'm sorry", k_refusal},
    {"i am sorry", k_refusal},
    {"i apologize", k_refusal},
    {"i can't help", k_refusal},
    {"i cannot help", k_refusal},
    {"i can't assist", k_refusal},
    {"i cannot assist", k_refusal},
    {"i can't provide", k_refusal},
    {"i cannot provide", k_refusal},
    {"i can't answer", k_refusal},
    {"i cannot answer", k_refusal},
    {"i can't fulfill", k_refusal},
    {"i cannot fulfill", k_refusal},
    {"i can't comply", k_refusal},
    {"i cannot comply", k_refusal},
    {"i'm unable to", k_refusal},
    {"i am unable to", k_refusal},
    {"i'm not able to", k_refusal},
    {"i am not able to", k_refusal},
    {"as an ai,", k_meta},
    {"as an ai language model", k_meta},
    {"as an ai assistant", k_meta},
    {"as a language model", k_meta},
    {"i'm an ai assistant", k_meta},
    {"i am an ai assistant", k_meta},
    {"i'm an ai language model", k_meta},
    {"i am an ai language model", k_meta},
    {"here's the answer", k_meta},
    {"here is the answer", k_meta},
    {"here's my answer", k_meta},
    {"here is my answer", k_meta},
};

// Interjections stripped from the front (rule 4b); "sure thing" before "sure", which would stop at " thing".
static const char *const k_interjections[] = {
    "sure thing", "sure", "certainly", "of course", "okay", "ok", "absolutely", "alright", "all right", "no problem",
    "great",      "yes",
};
// Openers of a lead-in sentence (rule 4c); cues as well.
static const char *const k_openers[] = {"here's a",   "here's an", "here's one",  "here is a",
                                        "here is an", "here is one", "here you go", "here it is"};
// Cues: a lead-in or a quote's preamble that holds one (or an opener) names the prompt it introduces, or only says
// yes to the request (rules 2, 4a, 4c, 6).
static const char *const k_cues[] = {
    "question", "questions", "request", "task", "prompt", "instruction", "example", "could be", "might be", "would be",
    "something like", "sure", "certainly", "of course", "okay", "ok", "absolutely", "alright", "all right",
};

static bool is_space(unsigned char c) {
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}
static bool is_letter(unsigned char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c >= 0x80; }
static bool is_word(unsigned char c) { return is_letter(c) || (c >= '0' && c <= '9'); }
static unsigned char lower(unsigned char c) { return c >= 'A' && c <= 'Z' ? (unsigned char)(c + 32) : c; }

static const unsigned char *skip_space(const unsigned char *p, const unsigned char *e) {
    while (p < e && is_space(*p)) p++;
    return p;
}

static const unsigned char *trim_end(const unsigned char *b, const unsigned char *e) {
    while (e > b && is_space(e[-1])) e--;
    return e;
}

static bool has_letter(const unsigned char *p, const unsigned char *e) {
    for (; p < e; p++)
        if (is_letter(*p)) return true;
    return false;
}

static int count_words(const unsigned char *p, const unsigned char *e) {
    int n = 0;
    while ((p = skip_space(p, e)) < e) {
        bool word = false;
        for (; p < e && !is_space(*p); p++) word = word || is_word(*p);
        n += word;
    }
    return n;
}

// Curly quotes and the apostrophe: U+201C “, U+201D ”, U+2019 ’, each E2 80 xx in UTF-8.
static bool is_e280(const unsigned char *p, const unsigned char *e, unsigned char last) {
    return e - p >= 3 && p[0] == 0xE2 && p[1] == 0x80 && p[2] == last;
}

// Bytes of the opening (closing) quote at p, or 0.
static size_t quote_open(const unsigned char *p, const unsigned char *e) {
    return *p == '"' ? 1 : is_e280(p, e, 0x9C) ? 3 : 0;
}
static size_t quote_close(const unsigned char *p, const unsigned char *e) {
    return *p == '"' ? 1 : is_e280(p, e, 0x9D) ? 3 : 0;
}

// Bytes of the text at p that the lowercase phrase matches, or 0.
static size_t match_here(const unsigned char *p, const unsigned char *e, const char *phrase) {
    const unsigned char *q = p;
    for (const unsigned char *s = (const unsigned char *)phrase; *s; s++) {
        if (q >= e) return 0;
        if (*s == '\'' && is_e280(q, e, 0x99)) q += 3;
        else if (*s == ' ' ? is_space(*q) : lower(*q) == *s) q++;
        else return 0;
    }
    return (size_t)(q - p);
}

// Bytes of the phrase at p as whole words (no letter or digit just before or after it, where it starts or ends with
// one; b is where the text starts), or 0.
static size_t phrase_at(const unsigned char *b, const unsigned char *p, const unsigned char *e, const char *phrase) {
    const size_t len = strlen(phrase);
    if (is_word((unsigned char)phrase[0]) && p > b && is_word(p[-1])) return 0;
    const size_t n = match_here(p, e, phrase);
    if (!n || (is_word((unsigned char)phrase[len - 1]) && p + n < e && is_word(p[n]))) return 0;
    return n;
}

static bool has_phrase(const unsigned char *b, const unsigned char *e, const char *phrase) {
    for (const unsigned char *p = b; p < e; p++)
        if (phrase_at(b, p, e, phrase)) return true;
    return false;
}

static bool has_cue(const unsigned char *b, const unsigned char *e) {
    for (size_t i = 0; i < N_OF(k_cues); i++)
        if (has_phrase(b, e, k_cues[i])) return true;
    for (size_t i = 0; i < N_OF(k_openers); i++)
        if (has_phrase(b, e, k_openers[i])) return true;
    return false;
}

static bool starts_with_any(const unsigned char *b, const unsigned char *e, const char *const *list, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (phrase_at(b, b, e, list[i])) return true;
    return false;
}

// Rule 2: narrows [*b, *e) to the quoted prompt when there is one.
static void take_quoted(const unsigned char **b, const unsigned char **e) {
    // the longest span; where the text before it ends and the text after it starts
    const unsigned char *best_b = NULL, *best_e = NULL, *before = NULL, *after = NULL;
    const unsigned char *start = NULL, *open_at = NULL;  // the span being read
    for (const unsigned char *p = *b; p < *e;) {
        size_t n;
        if (!start && (n = quote_open(p, *e))) {
            open_at = p;
            start = p += n;
        } else if (start && (n = quote_close(p, *e))) {
            const unsigned char *sb = skip_space(start, p), *se = trim_end(sb, p);
            if (count_words(sb, se) >= MIN_WORDS && (!best_b || se - sb > best_e - best_b)) {
                best_b = sb, best_e = se, before = open_at, after = p + n;
            }
            start = NULL;
            p += n;
        } else {
            p++;
        }
    }
    if (!best_b) return;
    const bool bare = !has_letter(*b, before) && !has_letter(after, *e);
    if (bare || has_cue(*b, before) || has_cue(after, *e)) *b = best_b, *e = best_e;
}

// Rule 4: where the text goes on after a lead-in at b (b at a non-space byte), or NULL when there is none.
static const unsigned char *lead_in_end(const unsigned char *b, const unsigned char *e) {
    // a. a first line that ends in ':' and holds a cue
    const unsigned char *nl = memchr(b, '\n', (size_t)(e - b));
    if (nl) {
        const unsigned char *le = trim_end(b, nl), *rest = skip_space(nl, e);
        if (le > b && le[-1] == ':' && rest < e && has_cue(b, le) && count_words(b, le) <= MAX_LEAD_WORDS) return rest;
    }
    // b. an interjection and its punctuation
    for (size_t i = 0; i < N_OF(k_interjections); i++) {
        const size_t n = phrase_at(b, b, e, k_interjections[i]);
        if (!n) continue;
        const unsigned char *p = b + n;
        while (p < e && (*p == ',' || *p == '.' || *p == '!' || *p == ':')) p++;
        if (p == b + n || (p < e && !is_space(*p))) continue;
        if ((p = skip_space(p, e)) < e) return p;
    }
    // c. a first clause with a cue before its ':', or opened by "here's a" and the like
    const unsigned char *c = b;
    while (c < e && *c != '\n' && !((*c == ':' || *c == '.' || *c == '!') && (c + 1 == e || is_space(c[1])))) c++;
    if (c == e) return NULL;
    const unsigned char *rest = skip_space(c + 1, e);
    if (rest == e || count_words(b, c) > MAX_LEAD_WORDS) return NULL;
    return (*c == ':' && has_cue(b, c)) || starts_with_any(b, c, k_openers, N_OF(k_openers)) ? rest : NULL;
}

// Rule 5: a copy of [b, e) (b at a non-space byte) with every line's trailing whitespace and the extra blank lines
// gone. It is never longer than the text: two newlines are written only where the text had a blank line.
static char *tidy(const unsigned char *b, const unsigned char *e) {
    char *out = dl_malloc((size_t)(e - b) + 1), *o = out;
    bool blank = false;
    while (b < e) {
        const unsigned char *nl = memchr(b, '\n', (size_t)(e - b)), *le = trim_end(b, nl ? nl : e);
        if (le == b) {
            blank = true;
        } else {
            if (o > out) {
                *o++ = '\n';
                if (blank) *o++ = '\n';
            }
            memcpy(o, b, (size_t)(le - b));
            o += le - b;
            blank = false;
        }
        b = nl ? nl + 1 : e;
    }
    *o = '\0';
    return out;
}

// Rule 3's phrases in [b, e): the reason, or NULL.
static const char *marker(const unsigned char *b, const unsigned char *e) {
    for (size_t i = 0; i < N_OF(k_markers); i++)
        if (has_phrase(b, e, k_markers[i].phrase)) return k_markers[i].why;
    return NULL;
}

// Rule 6 on the cleaned text: why it is no prompt, or NULL.
static const char *judge(const char *s) {
    const unsigned char *b = (const unsigned char *)s, *e = b + strlen(s);
    if (b == e) return "empty";
    if (!has_letter(b, e)) return "no letter";
    if (e[-1] == ':' && has_cue(b, e)) return k_meta;
    const int words = count_words(b, e);
    if (words < MIN_WORDS) return "too short";
    if (words > MAX_WORDS) return "too long";
    return NULL;
}

int prompt_filter(const char *text, char **out, const char **why) {
    const unsigned char *b = (const unsigned char *)(text ? text : ""), *e = b + strlen((const char *)b);
    const char *reason = "empty";
    *out = NULL;
    b = skip_space(b, e);
    e = trim_end(b, e);
    if (b < e) {
        take_quoted(&b, &e);
        reason = marker(b, e);
        if (!reason) {
            for (int k = 0; k < MAX_LEADS; k++) {
                const unsigned char *next = lead_in_end(b, e);
                if (!next) break;
                b = next;
            }
            char *s = tidy(b, e);
            reason = judge(s);
            if (reason) free(s);
            else *out = s;
        }
    }
    if (why) *why = reason;
    return reason == NULL;
}
