// Status propagation for every fallible boundary (config, model load, file formats).
// Abseil 20220623 has no public RETURN_IF_ERROR, so nibble defines its own.
#pragma once

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define NIBBLE_CONCAT_INNER_(a, b) a##b
#define NIBBLE_CONCAT_(a, b) NIBBLE_CONCAT_INNER_(a, b)

// Returns the status from the enclosing function when `expr` is not OK.
#define NIBBLE_RETURN_IF_ERROR(expr)                 \
  do {                                               \
    ::absl::Status nibble_status_ = (expr);          \
    if (!nibble_status_.ok()) return nibble_status_; \
  } while (false)

// `lhs = value of expr`, or returns its error status from the enclosing function.
#define NIBBLE_ASSIGN_OR_RETURN(lhs, expr) \
  NIBBLE_ASSIGN_OR_RETURN_IMPL_(NIBBLE_CONCAT_(nibble_statusor_, __LINE__), lhs, expr)
#define NIBBLE_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, expr) \
  auto statusor = (expr);                                   \
  if (!statusor.ok()) return std::move(statusor).status();  \
  lhs = std::move(statusor).value()
