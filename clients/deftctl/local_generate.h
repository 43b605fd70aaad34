// `deftctl generate --model PATH --prompt TEXT`: loads a model in-process and streams a
// completion to stdout. Returns the process exit code; errors go to stderr.
#pragma once

namespace deft::cli {

int RunLocalGenerate();

}  // namespace deft::cli
