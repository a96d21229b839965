// Stand-in for cuda_fp16.h (tests/cuda_emulator): __half as its 16 raw bits, with the device's round-to-nearest-even
// conversions done on the bits. NaN converts to the canonical 0x7fff, as __float2half_rn does.
#pragma once

#include <cstdint>
#include <cstring>

struct alignas(2) __half {
  uint16_t bits;
};

inline float __half2float(__half h) {
  const uint32_t sign = uint32_t(h.bits & 0x8000u) << 16;
  const uint32_t exponent = (h.bits >> 10) & 0x1fu, mantissa = h.bits & 0x3ffu;
  uint32_t out;
  if (exponent == 0x1f) {
    out = sign | 0x7f800000u | (mantissa << 13);  // inf / NaN
  } else if (exponent != 0) {
    out = sign | ((exponent + 112) << 23) | (mantissa << 13);  // rebias 15 -> 127
  } else if (mantissa == 0) {
    out = sign;
  } else {  // subnormal: mantissa * 2^-24, exact in float
    float f = float(mantissa) * 5.9604644775390625e-8f;
    std::memcpy(&out, &f, 4);
    out |= sign;
  }
  float f;
  std::memcpy(&f, &out, 4);
  return f;
}

inline __half __float2half_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return __half{0x7fff};
  if (a >= 0x477ff000u) return __half{uint16_t(sign | 0x7c00u)};  // >= 65520 rounds to infinity
  if (a < 0x38800000u) {  // below 2^-14: a multiple of 2^-24, rounded to nearest even (1024 is the smallest normal)
    float scaled;
    std::memcpy(&scaled, &a, 4);
    scaled *= 16777216.0f;  // exact: a power of two
    uint32_t q = uint32_t(scaled);
    const float rest = scaled - float(q);
    if (rest > 0.5f || (rest == 0.5f && (q & 1u))) ++q;
    return __half{uint16_t(sign | q)};
  }
  uint32_t h = ((((a >> 23) - 112) << 10) | ((a & 0x7fffffu) >> 13));
  const uint32_t rest = a & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // a carry into the exponent is the right result
  return __half{uint16_t(sign | h)};
}
