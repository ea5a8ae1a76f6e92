// test_prompt_filter.c: distill/prompt_filter.c, rule by rule, on a table of teacher replies: the kept prompt
// byte for byte, or the reason for the drop. Quoted prompts (straight, curly, mixed, the longest of several, a span
// under 4 words left alone, a prompt that quotes a sentence itself kept whole), lead-ins (a colon line, "Sure!" and
// its kin, "Question:" labels in any case, several in a row, a colon line without a cue kept), the offer / refusal /
// meta phrases (curly apostrophes too, and first-person user prompts that must stay), the size limits at their
// edges, blank lines and trailing whitespace, UTF-8 text, and replies in the style of SmolLM2-135M-Instruct.
#include <stdlib.h>
#include <string.h>

#include "distill/prompt_filter.h"
#include "tests/check.h"

typedef struct {
    const char *in;
    int keep;          // the return value wanted
    const char *want;  // the prompt (keep = 1) or the reason (keep = 0)
} Case;

// Runs one case; prints what differs. Also checks *out is NULL on a drop and *why NULL on a keep.
static int run_case(const Case *c, int line) {
    char *out = (char *)"unset";
    const char *why = "unset";
    const int r = prompt_filter(c->in, &out, &why);
    const char *got = r ? out : why;
    int ok = r == c->keep && got && strcmp(got, c->want) == 0 && (r ? why == NULL : out == NULL);
    if (!ok)
        fprintf(stderr, "line %d: in [%s]\n  want %d [%s]\n  got  %d [%s] (out %s, why %s)\n", line,
                c->in ? c->in : "(null)", c->keep, c->want, r, got ? got : "(null)", out ? "set" : "NULL",
                why ? why : "NULL");
    if (r) free(out);
    return ok;
}

#define KEEP(in, want) {in, 1, want}
#define DROP(in, why) {in, 0, why}

static void run_table(const Case *cases, int n, int line) {
    for (int i = 0; i < n; i++) {
        const int ok = run_case(&cases[i], line);
        if (!ok) fprintf(stderr, "  (case %d of the table)\n", i);
        CHECK(ok);
    }
}
#define RUN(cases) run_table(cases, (int)(sizeof(cases) / sizeof((cases)[0])), __LINE__)

// 1. trimming and empty input
static void test_empty(void) {
    static const Case cases[] = {
        DROP("", "empty"),
        DROP("   \n\t \r\n  ", "empty"),
        DROP(NULL, "empty"),
        KEEP("  \n\t How do I make fresh pasta at home?  \n\n", "How do I make fresh pasta at home?"),
    };
    RUN(cases);
}

// 2. quoted prompts
static void test_quotes(void) {
    static const Case cases[] = {
        // straight quotes after a preamble with a colon
        KEEP("Here's a question someone might ask about astronomy: \"What's the biggest planet in our solar system?\"",
             "What's the biggest planet in our solar system?"),
        // curly quotes, UTF-8 inside them
        KEEP("A good question might be: \xe2\x80\x9cHow do I keep basil fresh after cutting it?\xe2\x80\x9d",
             "How do I keep basil fresh after cutting it?"),
        KEEP("Here's a question: \xe2\x80\x9c\xc2\xbf" "C\xc3\xb3mo se prepara una paella valenciana?\xe2\x80\x9d",
             "\xc2\xbf" "C\xc3\xb3mo se prepara una paella valenciana?"),
        // a curly opening quote closed by a straight one
        KEEP("Sure, here is one: \xe2\x80\x9cWhat are the main causes of inflation today?\"",
             "What are the main causes of inflation today?"),
        // spaces inside the quotes go; the whole reply quoted; the preamble after the quote
        KEEP("\"  How can I improve my handwriting quickly?  \"", "How can I improve my handwriting quickly?"),
        KEEP("\"What is the best way to learn chess as an adult?\" is a question a beginner might ask.",
             "What is the best way to learn chess as an adult?"),
        // the longest span of several
        KEEP("Here are two questions: \"Why is the sky blue?\" and \"How do rainbows form after a summer storm?\"",
             "How do rainbows form after a summer storm?"),
        // a span under 4 words is quoted words, not a prompt
        KEEP("What does \"carpe diem\" really mean in everyday life?",
             "What does \"carpe diem\" really mean in everyday life?"),
        KEEP("Why do people say \"break a leg\" before a show?", "Why do people say \"break a leg\" before a show?"),
        // a prompt that quotes a sentence itself stays whole (no cue outside the quotes)
        KEEP("Translate \"Where is the train station, please?\" into French.",
             "Translate \"Where is the train station, please?\" into French."),
        KEEP("Translate the following sentence into French: \"I would like a cup of coffee.\"",
             "Translate the following sentence into French: \"I would like a cup of coffee.\""),
        KEEP("Write a short story that begins with \xe2\x80\x9cIt was a dark and stormy night.\xe2\x80\x9d",
             "Write a short story that begins with \xe2\x80\x9cIt was a dark and stormy night.\xe2\x80\x9d"),
        // the quoted span still goes through the other rules
        KEEP("Here's one: \"Question: How do volcanoes erupt on islands?\"", "How do volcanoes erupt on islands?"),
        DROP("Here is a question: \"What would you like me to help you with today?\"", "assistant offer"),
        DROP("Here's a question: \"Why is it?\"", "too short"),
        // an unclosed quote is no span
        KEEP("He is 6'2\" tall; what size bike frame should he ride?",
             "He is 6'2\" tall; what size bike frame should he ride?"),
        // what lies outside a quoted prompt is not searched for offers
        KEEP("Here's one: \"What is the tallest mountain in Africa?\" Let me know if you'd like another!",
             "What is the tallest mountain in Africa?"),
    };
    RUN(cases);
}

// 4. lead-ins
static void test_lead_ins(void) {
    static const Case cases[] = {
        KEEP("Sure! Here is a request:\nWrite a short poem about autumn leaves falling.",
             "Write a short poem about autumn leaves falling."),
        KEEP("I love this topic! Here's a question:\n\nHow do I start a vegetable garden?",
             "How do I start a vegetable garden?"),
        KEEP("Sure! How do I change a flat tire on my bike?", "How do I change a flat tire on my bike?"),
        KEEP("Sure, what are the health benefits of green tea?", "what are the health benefits of green tea?"),
        KEEP("Certainly! Explain how compound interest works.", "Explain how compound interest works."),
        KEEP("Of course! Can you explain how vaccines train the immune system?",
             "Can you explain how vaccines train the immune system?"),
        KEEP("Okay, explain the difference between weather and climate.",
             "explain the difference between weather and climate."),
        KEEP("Sure thing. Here's one.\nWhat causes the northern lights to appear?",
             "What causes the northern lights to appear?"),
        KEEP("Here you go!  Describe three ways to reduce food waste at home.",
             "Describe three ways to reduce food waste at home."),
        // labels, any case
        KEEP("Question: What is the capital city of Australia?", "What is the capital city of Australia?"),
        KEEP("REQUEST: Write a haiku about the ocean at night.", "Write a haiku about the ocean at night."),
        KEEP("task:  List three tips for staying focused while studying.",
             "List three tips for staying focused while studying."),
        KEEP("Prompt:\nDescribe a sunset over the mountains in vivid detail.",
             "Describe a sunset over the mountains in vivid detail."),
        // a preamble clause on the prompt's own line; several lead-ins in a row
        KEEP("Here's a question about gardening: How often should I water tomato plants?",
             "How often should I water tomato plants?"),
        KEEP("Sure! Here is a request for a slogan:\n\nRequest: Write a catchy slogan for a bicycle repair shop.",
             "Write a catchy slogan for a bicycle repair shop."),
        // a colon without a cue is part of the prompt; so is a colon inside a word or a time
        KEEP("Summarize the following paragraph:\nThe mitochondria is the powerhouse of the cell.",
             "Summarize the following paragraph:\nThe mitochondria is the powerhouse of the cell."),
        KEEP("If a train leaves at 10:30 and travels for 2 hours, when does it arrive?",
             "If a train leaves at 10:30 and travels for 2 hours, when does it arrive?"),
        KEEP("List three fruits that are high in vitamin C:", "List three fruits that are high in vitamin C:"),
        // the question mark ends no lead-in
        KEEP("How about a question about how to make a classic lasagna?",
             "How about a question about how to make a classic lasagna?"),
        // a lead-in and nothing after it; an interjection and nothing after it
        DROP("Here's a question someone might ask about cooking:", "not a prompt"),
        DROP("Sure! Here is a request:\n\n", "not a prompt"),
        DROP("Sure!", "too short"),
        // "Sure" and "Great" without their punctuation are words of the prompt
        KEEP("Great Expectations: summarize the plot in five sentences.",
             "Great Expectations: summarize the plot in five sentences."),
    };
    RUN(cases);
}

// 3. offers, refusals, talk about itself
static void test_markers(void) {
    static const Case cases[] = {
        DROP("I'm ready to assist. What question would you like me to help with?", "assistant offer"),
        DROP("I'd be happy to help! What would you like to know about cooking?", "assistant offer"),
        DROP("How can I help you today? I can answer questions about many topics.", "assistant offer"),
        DROP("Feel free to ask me anything about astronomy and space!", "assistant offer"),
        DROP("READY TO HELP with any question you have about baking.", "assistant offer"),
        DROP("What is the best way to learn Spanish? Let me know if you need another one.", "assistant offer"),
        DROP("I\xe2\x80\x99m sorry, but I can\xe2\x80\x99t create that kind of request.", "refusal"),
        DROP("I am unable to write a question about that topic.", "refusal"),
        DROP("Unfortunately I cannot provide a question on this subject.", "refusal"),
        DROP("As an AI language model, I do not have questions of my own.", "not a prompt"),
        DROP("Here's the answer: the biggest planet in our solar system is Jupiter.", "not a prompt"),
        // whole words only: "unready to helpfully" holds no phrase; neither does a user's own "I can't"
        KEEP("Why is my puppy unready to helpfully fetch the ball?", "Why is my puppy unready to helpfully fetch the ball?"),
        KEEP("I can't get my sourdough bread to rise, what am I doing wrong?",
             "I can't get my sourdough bread to rise, what am I doing wrong?"),
        KEEP("I cannot decide between a laptop and a tablet for college. Which is better?",
             "I cannot decide between a laptop and a tablet for college. Which is better?"),
        // nor a bare "here is" a lead-in
        KEEP("Here is my plan for the week, let me know if it is realistic: gym daily, read two books.",
             "Here is my plan for the week, let me know if it is realistic: gym daily, read two books."),
        // a lead-in is searched too (it goes only after the search)
        DROP("I'd be happy to help! Here's a question:\nWhat is the tallest mountain in Africa?", "assistant offer"),
    };
    RUN(cases);
}

// 5 and 6: whitespace; letters and size
static void test_size_and_whitespace(void) {
    static const Case cases[] = {
        DROP("1 2 3 4 5 6 7", "no letter"),
        DROP("... ??? !!! ---", "no letter"),
        DROP("Cooking tips?", "too short"),
        DROP("Explain photosynthesis please.", "too short"),
        KEEP("Explain photosynthesis to children.", "Explain photosynthesis to children."),
        // punctuation alone is no word
        DROP("Why ? is it ?", "too short"),
        KEEP("What is 6 times 7?", "What is 6 times 7?"),
        // blank lines collapse, trailing whitespace and \r go, indentation stays
        KEEP("List three fruits.   \n\n\n \t \nThen rank them by sweetness.  \t\n\n",
             "List three fruits.\n\nThen rank them by sweetness."),
        KEEP("Name two planets.\r\nWhich one is bigger?\r\n", "Name two planets.\nWhich one is bigger?"),
        KEEP("Fix the bug in this code:\n    x = 1 \n\n\n    print(x +)", "Fix the bug in this code:\n    x = 1\n\n    print(x +)"),
    };
    RUN(cases);

    // 200 words are kept, 201 are too long
    char text[2048] = "Write";
    for (int i = 1; i < 200; i++) strcat(text, " word");
    char *out = NULL;
    const char *why = NULL;
    CHECK_EQ_I64(prompt_filter(text, &out, &why), 1);
    CHECK(out && strcmp(out, text) == 0);
    free(out);
    strcat(text, " more");
    CHECK_EQ_I64(prompt_filter(text, &out, &why), 0);
    CHECK(out == NULL && why && strcmp(why, "too long") == 0);
    // a NULL why is allowed
    CHECK_EQ_I64(prompt_filter("", &out, NULL), 0);
    CHECK(out == NULL);
}

// UTF-8: bytes >= 0x80 are letters, never case-folded or split
static void test_utf8(void) {
    static const Case cases[] = {
        KEEP("Comment pr\xc3\xa9parer une cr\xc3\xaape au chocolat ?", "Comment pr\xc3\xa9parer une cr\xc3\xaape au chocolat ?"),
        KEEP("  Wie backe ich ein Brot ohne Hefe?\xc2\xa0  ", "Wie backe ich ein Brot ohne Hefe?\xc2\xa0"),
        KEEP("\xe6\x97\xa5\xe6\x9c\xac \xe3\x81\xae \xe9\xa6\x96\xe9\x83\xbd \xe3\x81\xaf",
             "\xe6\x97\xa5\xe6\x9c\xac \xe3\x81\xae \xe9\xa6\x96\xe9\x83\xbd \xe3\x81\xaf"),
        DROP("\xe6\x9d\xb1\xe4\xba\xac\xe3\x81\xaf\xe3\x81\xa9\xe3\x81\x93\xe3\x81\xa7\xe3\x81\x99\xe3\x81\x8b",
             "too short"),
        // a curly quote's bytes inside other text are no quote; the apostrophe of "Here’s" is
        KEEP("Here\xe2\x80\x99s a question: \xe2\x80\x9c\xc3\x89tude: how do I practice piano scales daily?\xe2\x80\x9d",
             "\xc3\x89tude: how do I practice piano scales daily?"),
        KEEP("Sure! \xe2\x80\x94 What is the history of the \xe2\x80\x9cMona Lisa\xe2\x80\x9d painting?",
             "\xe2\x80\x94 What is the history of the \xe2\x80\x9cMona Lisa\xe2\x80\x9d painting?"),
    };
    RUN(cases);
}

// Replies in the style of SmolLM2-135M-Instruct to data/prompt-requests.jsonl's requests.
static void test_smollm2_style(void) {
    static const Case cases[] = {
        DROP("I'm ready to assist. What question would you like me to help with?", "assistant offer"),
        KEEP("How about a question about how to make a classic lasagna?",
             "How about a question about how to make a classic lasagna?"),
        KEEP("Here's a question someone might ask about astronomy: \"What's the biggest planet in our solar system?\"",
             "What's the biggest planet in our solar system?"),
        KEEP("Sure! Here is a request:\nWrite a short poem about autumn leaves falling.",
             "Write a short poem about autumn leaves falling."),
        KEEP("A possible question could be: \"How to start a business with a limited budget?\"",
             "How to start a business with a limited budget?"),
        KEEP("The request would be: \"Explain to a beginner what a yoga flow is and how to begin one.\" This helps "
             "beginners understand yoga.",
             "Explain to a beginner what a yoga flow is and how to begin one."),
        DROP("Sure, I'd be happy to help you with that. Please provide the topic and I will write a question.",
             "assistant offer"),
        DROP("The periodic table is a tabular arrangement of the chemical elements, ordered by their atomic number, "
             "electron configuration, and recurring chemical properties. It was first published by Dmitri Mendeleev "
             "in 1869. The table has rows called periods and columns called groups. Elements in the same group have "
             "similar chemical properties because they have the same number of valence electrons. The table is "
             "divided into metals, nonmetals, and metalloids. Metals are found on the left side and in the middle, "
             "while nonmetals are on the right side. Metalloids form a staircase between them. The periodic table "
             "helps scientists predict the properties of elements and their compounds. It has been expanded many "
             "times as new elements were discovered or synthesized in laboratories. Today it contains 118 confirmed "
             "elements, from hydrogen with atomic number 1 to oganesson with atomic number 118. Students learn the "
             "periodic table in chemistry classes around the world, and many memorize the first twenty elements. "
             "The table also shows trends such as electronegativity, atomic radius, and ionization energy, which "
             "change in regular ways across periods and down groups, and these trends explain much of chemistry. "
             "Noble gases sit in the last column and rarely react, while alkali metals in the first column react "
             "strongly with water. Learning these patterns makes the rest of chemistry much easier to follow.",
             "too long"),
    };
    RUN(cases);
}

int main(void) {
    test_empty();
    test_quotes();
    test_lead_ins();
    test_markers();
    test_size_and_whitespace();
    test_utf8();
    test_smollm2_style();
    return check_report("test_prompt_filter");
}
