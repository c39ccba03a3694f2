// Whether this translation unit is built with AddressSanitizer (GCC defines
// __SANITIZE_ADDRESS__, clang answers __has_feature): code that works
// beside the sanitizer's assumptions (a child running on a stack of its
// own) takes another way there, and tests that measure memory relax.
#pragma once

#if defined(__SANITIZE_ADDRESS__)
#define CELLA_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define CELLA_ASAN 1
#endif
#endif

namespace cella {

#if defined(CELLA_ASAN)
inline constexpr bool kUnderAsan = true;
#else
inline constexpr bool kUnderAsan = false;
#endif

}  // namespace cella
