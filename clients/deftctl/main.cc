// deftctl: the deft-serve command-line tool.
//   deftctl generate --prompt TEXT [--model PATH] [sampling flags]   (local, no server)
//   deftctl tree ... | model info | tokenize | detokenize             (gRPC, --server ADDRESS)
#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "clients/deftctl/local_generate.h"
#include "clients/deftctl/remote.h"

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "deft-serve command-line tool.\n"
      "Local (loads the model in-process):\n"
      "  deftctl generate --prompt TEXT [--model PATH] [--max_tokens N] [--temperature T] ...\n"
      "Against a deft-server (--server HOST:PORT, --api_key KEY | --api_key_file F, --tls_ca PEM,\n"
      "--timeout SECONDS):\n"
      "  deftctl tree create [TEXT] [--prompt TEXT] [--chat [--system S]] [--tokens IDS]\n"
      "  deftctl tree fork TREE NODE [--offset N] [--count N]\n"
      "  deftctl tree extend TREE NODE [TEXT] [--tokens IDS]\n"
      "  deftctl tree generate TREE [NODE...] [--branches N] [--max_tokens N] [--temperature T]\n"
      "  deftctl tree verify TREE NODE --tokens IDS --parents=IDS\n"
      "  deftctl tree beam TREE NODE [--width N] [--max_tokens N]\n"
      "  deftctl tree prune TREE NODE | tree show TREE | tree delete TREE | tree list\n"
      "  deftctl model info | tokenize TEXT [--parse_special] | detokenize IDS\n"
      "Run `deftctl --helpfull` for every flag.");
  std::vector<char*> positional = absl::ParseCommandLine(argc, argv);
  if (positional.size() < 2) {
    std::fprintf(stderr, "%s\n", absl::ProgramUsageMessage().data());
    return 2;
  }
  const std::string command = positional[1];
  if (deft::cli::IsRemoteCommand(command)) {
    return deft::cli::RunRemoteCommand(
        std::vector<std::string>(positional.begin() + 1, positional.end()));
  }
  if (positional.size() > 2) {
    std::fprintf(stderr, "deftctl: unexpected argument '%s'\n", positional[2]);
    return 2;
  }
  if (command == "generate") return deft::cli::RunLocalGenerate();
  std::fprintf(stderr, "deftctl: unknown command '%s'\n%s\n", command.c_str(),
               absl::ProgramUsageMessage().data());
  return 2;
}
