#include "clients/cli/fetch.h"

#include <curl/curl.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <memory>

#include "absl/strings/str_cat.h"
#include "clients/cli/commands.h"
#include "engine/sha256.h"

namespace nibble::cli {
namespace fs = std::filesystem;
namespace {

struct FileCloser {
  void operator()(std::FILE* f) const {
    if (f) std::fclose(f);
  }
};

size_t WriteToFile(char* data, size_t size, size_t count, void* file) {
  return std::fwrite(data, size, count, static_cast<std::FILE*>(file)) * size;
}

// Transfers `url` into the open file; curl's own message on failure.
absl::Status CurlToFile(const std::string& url, std::FILE* file) {
  static const CURLcode global_init = curl_global_init(CURL_GLOBAL_DEFAULT);
  if (global_init != CURLE_OK) return absl::InternalError("libcurl failed to initialize");
  std::unique_ptr<CURL, decltype(&curl_easy_cleanup)> curl(curl_easy_init(), curl_easy_cleanup);
  if (!curl) return absl::InternalError("libcurl: cannot create a transfer");
  char error[CURL_ERROR_SIZE] = {0};
  curl_easy_setopt(curl.get(), CURLOPT_URL, url.c_str());
  curl_easy_setopt(curl.get(), CURLOPT_FOLLOWLOCATION, 1L);  // HF resolves to a CDN
  curl_easy_setopt(curl.get(), CURLOPT_FAILONERROR, 1L);     // HTTP >= 400 is an error
  curl_easy_setopt(curl.get(), CURLOPT_WRITEFUNCTION, WriteToFile);
  curl_easy_setopt(curl.get(), CURLOPT_WRITEDATA, file);
  curl_easy_setopt(curl.get(), CURLOPT_ERRORBUFFER, error);
  curl_easy_setopt(curl.get(), CURLOPT_CONNECTTIMEOUT, 30L);
  curl_easy_setopt(curl.get(), CURLOPT_LOW_SPEED_LIMIT, 1L);  // stalled for a minute: give up
  curl_easy_setopt(curl.get(), CURLOPT_LOW_SPEED_TIME, 60L);
  const CURLcode code = curl_easy_perform(curl.get());
  if (code != CURLE_OK) {
    return absl::UnavailableError(absl::StrCat(
        url, ": download failed: ", error[0] ? error : curl_easy_strerror(code)));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status DownloadFile(const std::string& url, const std::string& dest,
                          std::string_view expected_sha256) {
  const fs::path dest_path(dest);
  std::error_code ec;
  if (dest_path.has_parent_path()) fs::create_directories(dest_path.parent_path(), ec);
  const std::string temp = absl::StrCat(dest, ".part-", getpid());
  absl::Status status;
  if (url.find("://") == std::string::npos) {
    fs::copy_file(url, temp, fs::copy_options::overwrite_existing, ec);
    if (ec) status = absl::NotFoundError(absl::StrCat(url, ": cannot copy: ", ec.message()));
  } else {
    std::unique_ptr<std::FILE, FileCloser> file(std::fopen(temp.c_str(), "wb"));
    if (!file) return absl::PermissionDeniedError(absl::StrCat(temp, ": cannot create"));
    status = CurlToFile(url, file.get());
    if (status.ok() && (std::fflush(file.get()) != 0 || fsync(fileno(file.get())) != 0)) {
      status = absl::DataLossError(absl::StrCat(temp, ": cannot write"));
    }
  }
  if (status.ok() && !expected_sha256.empty()) {
    auto actual = Sha256OfFile(temp);
    if (!actual.ok()) {
      status = actual.status();
    } else if (*actual != expected_sha256) {
      status = absl::DataLossError(absl::StrCat(url, ": sha256 is ", *actual, ", expected ",
                                                std::string(expected_sha256),
                                                " (a different or corrupted file)"));
    }
  }
  if (status.ok()) {
    fs::rename(temp, dest, ec);
    if (ec) status = absl::InternalError(absl::StrCat("cannot rename ", temp, ": ", ec.message()));
  }
  if (!status.ok()) fs::remove(temp, ec);
  return status;
}

const std::vector<KnownModel>& KnownModels() {
  // Checksums of the copies nibble's tests run on (llama2.c's stories260K: Karpathy's
  // tinyllamas on Hugging Face). A source serving other bytes is refused, not used.
  static const std::vector<KnownModel> models = {
      {"stories260K",
       "https://huggingface.co/karpathy/tinyllamas/resolve/main/stories260K",
       {{"stories260K.bin", "b0a507e7ad0f626624f17112325e66691f9076d622e1d3274d103d00299f2696"},
        {"tok512.bin", "037cb335abb25d1fa9e8ecae30ed2a3a8ace9302862ebcdc05d51a6bbb10c312"}}},
  };
  return models;
}

CommandRunner RegisterFetch(CLI::App& app) {
  CLI::App* cmd = app.add_subcommand(
      "fetch", "Download a known model's files, verified by sha256 (stories260K)");
  struct Options {
    std::string model = "stories260K";
    std::string out;
    std::string source;
  };
  auto options = std::make_shared<Options>();
  cmd->add_option("model", options->model, "model name")->check(CLI::IsMember({"stories260K"}));
  cmd->add_option("--out", options->out, "directory to write the files to")->required();
  cmd->add_option("--source", options->source,
                  "where to fetch from: a URL prefix (https://, file://) or a local mirror "
                  "directory; default $NIBBLE_MODEL_MIRROR, else the public address")
      ->envname("NIBBLE_MODEL_MIRROR");
  return [options]() {
    for (const KnownModel& model : KnownModels()) {
      if (model.name != options->model) continue;
      const std::string source = options->source.empty() ? model.default_source : options->source;
      for (const KnownFile& file : model.files) {
        const std::string dest = (fs::path(options->out) / file.name).string();
        auto existing = fs::exists(dest) ? Sha256OfFile(dest) : absl::StatusOr<std::string>("");
        if (existing.ok() && *existing == file.sha256) {
          std::fprintf(stderr, "%s: present, sha256 verified\n", dest.c_str());
          continue;
        }
        const std::string url = absl::StrCat(source, "/", file.name);
        std::fprintf(stderr, "fetching %s\n", url.c_str());
        absl::Status status = DownloadFile(url, dest, file.sha256);
        if (!status.ok()) {
          return ReportError("fetch", status);
        }
      }
      return 0;
    }
    return 2;
  };
}

}  // namespace nibble::cli
