// Uses the installed client: builds and validates a request, prints the
// default socket path, and connects to a socket that does not exist.
#include <mnemo/client.h>

#include <cstdio>

int main() {
  namespace mc = mnemo::client;
  mc::GenerateRequest req;
  req.session = "consumer";
  req.messages = {{"user", "Hello"}};
  req.sampling.temperature = 0.0f;
  const mnemo::Status valid = mnemo::protocol::ValidateGenerate(req);
  std::printf("default socket: %s\n", mc::DefaultSocketPath().c_str());
  std::printf("request valid: %s\n", valid.ToString().c_str());

  mc::ConnectOptions options;
  options.socket_path = "/nonexistent-mnemo-dir/mnemod.sock";
  auto client = mc::Client::Connect(options);
  std::printf("connect to a missing socket: %s\n", client.status().ToString().c_str());
  return valid.ok() && client.status().code() == mnemo::StatusCode::kNotFound ? 0 : 1;
}
