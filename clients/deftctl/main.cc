// deftctl: the deft-serve command-line tool.
//   deftctl generate --model PATH --prompt TEXT [sampling flags]
#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "clients/deftctl/local_generate.h"

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "deft-serve command-line tool.\n"
      "  deftctl generate --prompt TEXT [--model PATH] [--max_tokens N] [--temperature T] ...\n"
      "Run `deftctl --helpfull` for every flag.");
  std::vector<char*> positional = absl::ParseCommandLine(argc, argv);
  if (positional.size() < 2) {
    std::fprintf(stderr, "%s\n", absl::ProgramUsageMessage().data());
    return 2;
  }
  const std::string command = positional[1];
  if (positional.size() > 2) {
    std::fprintf(stderr, "deftctl: unexpected argument '%s'\n", positional[2]);
    return 2;
  }
  if (command == "generate") return deft::cli::RunLocalGenerate();
  std::fprintf(stderr, "deftctl: unknown command '%s'\n%s\n", command.c_str(),
               absl::ProgramUsageMessage().data());
  return 2;
}
