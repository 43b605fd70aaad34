// Flags shared by deftctl's subcommands; see flags.h.
#include "clients/deftctl/flags.h"

#include "absl/flags/flag.h"

ABSL_FLAG(std::string, prompt, "", "Prompt text");
ABSL_FLAG(std::string, system, "", "System message (chat mode)");
ABSL_FLAG(int32_t, max_tokens, 128, "Tokens to generate at most (per branch)");
ABSL_FLAG(double, temperature, 0.0, "Sampling temperature (0: greedy)");
ABSL_FLAG(int32_t, top_k, 0, "Top-k (0: off)");
ABSL_FLAG(double, top_p, 1.0, "Top-p in (0, 1]");
ABSL_FLAG(double, min_p, 0.0, "Min-p in [0, 1)");
ABSL_FLAG(double, repetition_penalty, 1.0, "Repetition penalty (1: off)");
ABSL_FLAG(uint64_t, seed, 0, "Sampling seed (branch i of a tree generate uses seed + i)");
ABSL_FLAG(std::string, stop, "", "Comma-separated stop strings");
