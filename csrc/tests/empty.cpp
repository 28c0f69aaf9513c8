// Keeps the CPU kernel library non-empty before any op exists.
namespace roberta_fast { int native_library_marker = 0; }
