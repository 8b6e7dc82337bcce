// The rover serial protocol, firmware side (see docs/serial-protocol.md).
//
// Plain C++ without Arduino dependencies, so the same code compiles into the sketch (avr-g++) and into the
// host test (g++, firmware/test/protocol_host.cpp) that checks it against tests/vectors/serial_protocol.json.
// Time is passed in as milliseconds (Arduino's millis()); all time arithmetic is wrap-safe.
#ifndef ROVER_PROTOCOL_H
#define ROVER_PROTOCOL_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// The version and protocol a build answers with (`make FIRMWARE_DEFINES=...` builds others: the flashing tests
// upgrade and downgrade between such builds).
#ifndef ROVER_PROTOCOL_VERSION
#define ROVER_PROTOCOL_VERSION 2
#endif
#define ROVER_FIRMWARE_NAME "rover_car"
#ifndef ROVER_FIRMWARE_VERSION
#define ROVER_FIRMWARE_VERSION "2.0.0"
#endif
#define ROVER_MAX_LINE 63    // characters before '\n'; longer lines are rejected
#define ROVER_REPLY_MAX 72   // a reply line including "*XX\n" and the terminating NUL
#define ROVER_TICK_MAX (2 * ROVER_REPLY_MAX)  // rover_tick writes up to two lines (T and R)
#define ROVER_NEUTRAL_US 1500
#define ROVER_FLAG_FAILSAFE 0x01  // the Pi's link timed out: its commands are not applied (neutral or driver)
#define ROVER_FLAG_LIMITED 0x02   // the command was limited to the firmware's own microsecond limits
#define ROVER_FLAG_RC 0x04        // the transmitter side decides the outputs (manual, or receiver lost)
#define ROVER_FEATURE_RECEIVER 0x01  // V line features: an RC receiver is fitted
#define ROVER_FEATURE_WHEEL 0x02     // a wheel speed sensor is fitted
#define ROVER_FEATURE_BATTERY 0x04   // the battery voltage is measured

// RC receiver channels (pulse widths measured by the sketch) and the modes the switch channel selects.
#define ROVER_RC_STEERING 0
#define ROVER_RC_THROTTLE 1
#define ROVER_RC_SWITCH 2
#define ROVER_RC_CHANNELS 3
#define ROVER_RC_MIN_US 800       // a pulse outside 800..2200 us is no signal
#define ROVER_RC_MAX_US 2200
#define ROVER_RC_SWITCH_LOW_US 1300   // switch below: manual
#define ROVER_RC_SWITCH_HIGH_US 1700  // switch above: autopilot, neutral fallback; between: manual fallback
#define ROVER_MODE_PI 0               // no receiver fitted: the Pi's commands drive (bench, simulator)
#define ROVER_MODE_MANUAL 1           // the driver's sticks pass straight through; the Pi is ignored
#define ROVER_MODE_AUTO 2             // the Pi drives; when it goes quiet the driver's sticks take over
#define ROVER_MODE_AUTO_NEUTRAL 3     // the Pi drives; when it goes quiet the outputs go neutral
#define ROVER_MODE_RC_LOST 4          // a receiver channel has no valid signal: neutral

struct RoverLimits {
  uint16_t steer_min_us, steer_max_us, throttle_min_us, throttle_max_us;
  uint16_t half_range_us;      // microseconds for a full +-1000 command
  uint16_t timeout_ms;         // failsafe: the Pi's commands stop applying when no valid C/H within this time
  uint16_t telemetry_ms;       // period of the T and R lines
  uint8_t rc_receiver;         // 1: an RC receiver is fitted and in charge (its switch selects the mode)
  uint16_t rc_timeout_ms;      // a receiver channel without a valid pulse for this long has lost its signal
  uint8_t sensors;             // ROVER_FEATURE_WHEEL | ROVER_FEATURE_BATTERY: the sensors fitted
};

struct RoverCore {
  RoverLimits limits;
  uint16_t steer_us, throttle_us;  // the outputs
  uint16_t pi_steer_us, pi_throttle_us;  // the Pi's last command, as pulse widths
  uint8_t failsafe;            // 1: the Pi's link timed out (at boot and after a timeout)
  uint8_t mode;                // ROVER_MODE_*
  uint8_t from_rc;             // the outputs are decided by the transmitter side
  uint8_t overflow;            // the current line grew past ROVER_MAX_LINE
  uint8_t len;
  uint16_t last_seq;
  uint32_t last_valid_ms;      // last valid C or H
  uint32_t last_telemetry_ms;
  uint32_t rx_ok, rx_bad;
  uint16_t rc_us[ROVER_RC_CHANNELS];  // last pulse width per receiver channel (0: none yet)
  uint32_t rc_ms[ROVER_RC_CHANNELS];  // when it was measured
  uint16_t wheel_mmps, battery_mv;    // sensors (0: not fitted)
  char buf[ROVER_MAX_LINE + 1];
};

static inline uint8_t rover_crc8(const char* data, size_t n) {
  uint8_t crc = 0;
  for (size_t i = 0; i < n; i++) {
    crc ^= (uint8_t)data[i];
    for (uint8_t b = 0; b < 8; b++) crc = (crc & 0x80) ? (uint8_t)((crc << 1) ^ 0x07) : (uint8_t)(crc << 1);
  }
  return crc;
}

// Appends "*XX\n" to the payload in out (which must have room); returns the total length.
static inline size_t rover_frame(char* out) {
  size_t n = strlen(out);
  static const char hex[] = "0123456789ABCDEF";
  uint8_t crc = rover_crc8(out, n);
  out[n] = '*';
  out[n + 1] = hex[crc >> 4];
  out[n + 2] = hex[crc & 0x0F];
  out[n + 3] = '\n';
  out[n + 4] = '\0';
  return n + 4;
}

static inline int rover_hex(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  return -1;
}

// Parses a decimal integer field ending at ',' or end of payload; strict: optional '-', then 1..10 digits.
static inline bool rover_int(const char** p, const char* end, long low, long high, long* value) {
  const char* s = *p;
  bool negative = false;
  if (s < end && *s == '-') { negative = true; s++; }
  long v = 0;
  int digits = 0;
  while (s < end && *s >= '0' && *s <= '9') {
    if (digits >= 10) return false;
    v = v * 10 + (*s - '0');
    if (v > 100000000L) return false;  // larger than any field we accept, and no overflow
    digits++;
    s++;
  }
  if (digits == 0) return false;
  if (s < end && *s != ',') return false;
  if (negative) v = -v;
  if (v < low || v > high) return false;
  *value = v;
  *p = (s < end) ? s + 1 : s;
  return true;
}

// A command value in [-1000, 1000] -> pulse width: center + milli * half_range / 1000 (C division truncates).
static inline long rover_milli_to_us(long milli, uint16_t half_range_us) {
  return ROVER_NEUTRAL_US + milli * (long)half_range_us / 1000;
}

static inline uint16_t rover_clamp_us(long us, uint16_t low, uint16_t high, uint8_t* flags) {
  if (us < low) { *flags |= ROVER_FLAG_LIMITED; return low; }
  if (us > high) { *flags |= ROVER_FLAG_LIMITED; return high; }
  return (uint16_t)us;
}

static inline uint8_t rover_rc_valid(const RoverCore* core, uint8_t channel, uint32_t now_ms) {
  uint16_t us = core->rc_us[channel];
  return us >= ROVER_RC_MIN_US && us <= ROVER_RC_MAX_US &&
         (uint32_t)(now_ms - core->rc_ms[channel]) < core->limits.rc_timeout_ms;
}

// The mode the receiver selects now.
static inline uint8_t rover_rc_mode(const RoverCore* core, uint32_t now_ms) {
  if (!core->limits.rc_receiver) return ROVER_MODE_PI;
  for (uint8_t ch = 0; ch < ROVER_RC_CHANNELS; ch++) {
    if (!rover_rc_valid(core, ch, now_ms)) return ROVER_MODE_RC_LOST;
  }
  uint16_t sw = core->rc_us[ROVER_RC_SWITCH];
  if (sw < ROVER_RC_SWITCH_LOW_US) return ROVER_MODE_MANUAL;
  return sw <= ROVER_RC_SWITCH_HIGH_US ? ROVER_MODE_AUTO : ROVER_MODE_AUTO_NEUTRAL;
}

// Recomputes the failsafe, the mode and the outputs. Called on every valid line and every tick.
static inline void rover_update(RoverCore* core, uint32_t now_ms) {
  if (!core->failsafe && (uint32_t)(now_ms - core->last_valid_ms) >= core->limits.timeout_ms) {
    core->failsafe = 1;
  }
  uint8_t mode = rover_rc_mode(core, now_ms);
  uint8_t sticks = mode == ROVER_MODE_MANUAL || (mode == ROVER_MODE_AUTO && core->failsafe);
  uint8_t flags = 0;
  if (sticks) {
    core->steer_us = rover_clamp_us(core->rc_us[ROVER_RC_STEERING], core->limits.steer_min_us,
                                    core->limits.steer_max_us, &flags);
    core->throttle_us = rover_clamp_us(core->rc_us[ROVER_RC_THROTTLE], core->limits.throttle_min_us,
                                       core->limits.throttle_max_us, &flags);
  } else if (mode == ROVER_MODE_RC_LOST || core->failsafe) {
    core->steer_us = ROVER_NEUTRAL_US;
    core->throttle_us = ROVER_NEUTRAL_US;
  } else {
    core->steer_us = core->pi_steer_us;
    core->throttle_us = core->pi_throttle_us;
  }
  core->mode = mode;
  core->from_rc = sticks || mode == ROVER_MODE_RC_LOST;
}

// A pulse width measured on a receiver channel (any width: out-of-range ones count as no signal).
static inline void rover_rc_pulse(RoverCore* core, uint8_t channel, uint16_t width_us, uint32_t now_ms) {
  if (channel >= ROVER_RC_CHANNELS) return;
  core->rc_us[channel] = width_us;
  core->rc_ms[channel] = now_ms;
}

static inline uint8_t rover_flags(const RoverCore* core) {
  return (uint8_t)((core->failsafe ? ROVER_FLAG_FAILSAFE : 0) | (core->from_rc ? ROVER_FLAG_RC : 0));
}

static inline void rover_init(RoverCore* core, const RoverLimits* limits, uint32_t now_ms) {
  memset(core, 0, sizeof(*core));
  core->limits = *limits;
  core->steer_us = ROVER_NEUTRAL_US;
  core->throttle_us = ROVER_NEUTRAL_US;
  core->pi_steer_us = ROVER_NEUTRAL_US;
  core->pi_throttle_us = ROVER_NEUTRAL_US;
  core->failsafe = 1;
  core->last_valid_ms = now_ms;
  core->last_telemetry_ms = now_ms;
  rover_update(core, now_ms);
}

// Handles one complete line (without '\n'). Returns the reply length written to out (0: no reply).
static inline size_t rover_handle_line(RoverCore* core, char* line, size_t n, uint32_t now_ms, char* out) {
  out[0] = '\0';
  if (n >= 1 && line[n - 1] == '\r') n--;
  if (n == 0) return 0;  // empty lines (e.g. from "\r\n") are ignored, not counted
  // Framing: "<payload>*XX", printable ASCII only.
  if (n < 4 || line[n - 3] != '*') { core->rx_bad++; return 0; }
  for (size_t i = 0; i < n - 3; i++) {
    if (line[i] < 0x20 || line[i] > 0x7E || line[i] == '*') { core->rx_bad++; return 0; }
  }
  int hi = rover_hex(line[n - 2]), lo = rover_hex(line[n - 1]);
  size_t plen = n - 3;
  if (hi < 0 || lo < 0 || (uint8_t)(hi * 16 + lo) != rover_crc8(line, plen)) { core->rx_bad++; return 0; }
  const char* end = line + plen;
  if (plen < 3 || line[1] != ',') { core->rx_bad++; return 0; }
  const char* p = line + 2;
  long seq = 0, steer = 0, throttle = 0;
  char kind = line[0];
  if (!rover_int(&p, end, 0, 65535, &seq)) { core->rx_bad++; return 0; }
  if (kind == 'C') {
    if (!rover_int(&p, end, -1000, 1000, &steer) || !rover_int(&p, end, -1000, 1000, &throttle) || p != end ||
        end[-1] == ',') {
      core->rx_bad++;
      return 0;
    }
    uint8_t limited = 0;
    uint16_t half = core->limits.half_range_us;
    core->pi_steer_us = rover_clamp_us(rover_milli_to_us(steer, half), core->limits.steer_min_us,
                                       core->limits.steer_max_us, &limited);
    core->pi_throttle_us = rover_clamp_us(rover_milli_to_us(throttle, half), core->limits.throttle_min_us,
                                          core->limits.throttle_max_us, &limited);
    core->failsafe = 0;
    core->last_valid_ms = now_ms;
    core->last_seq = (uint16_t)seq;
    core->rx_ok++;
    rover_update(core, now_ms);
    snprintf(out, ROVER_REPLY_MAX, "A,%u,%u,%u,%u", (unsigned)seq, (unsigned)core->steer_us,
             (unsigned)core->throttle_us, (unsigned)(rover_flags(core) | limited));
    return rover_frame(out);
  }
  if (p != end || end[-1] == ',') { core->rx_bad++; return 0; }
  if (kind == 'H') {
    core->last_valid_ms = now_ms;
    core->last_seq = (uint16_t)seq;
    core->rx_ok++;
    rover_update(core, now_ms);
    snprintf(out, ROVER_REPLY_MAX, "A,%u,%u,%u,%u", (unsigned)seq, (unsigned)core->steer_us,
             (unsigned)core->throttle_us, (unsigned)rover_flags(core));
    return rover_frame(out);
  }
  if (kind == 'P') {
    core->rx_ok++;
    unsigned features = (core->limits.rc_receiver ? ROVER_FEATURE_RECEIVER : 0) | core->limits.sensors;
    snprintf(out, ROVER_REPLY_MAX, "V,%u,%d,%s,%s,%u", (unsigned)seq, ROVER_PROTOCOL_VERSION, ROVER_FIRMWARE_NAME,
             ROVER_FIRMWARE_VERSION, features);
    return rover_frame(out);
  }
  core->rx_bad++;
  return 0;
}

// Feeds one received byte. Returns the reply length written to out when the byte completed a line.
static inline size_t rover_feed(RoverCore* core, char c, uint32_t now_ms, char* out) {
  if (c == '\n') {
    size_t n = core->len;
    uint8_t overflow = core->overflow;
    core->len = 0;
    core->overflow = 0;
    if (overflow) { core->rx_bad++; out[0] = '\0'; return 0; }
    core->buf[n] = '\0';
    return rover_handle_line(core, core->buf, n, now_ms, out);
  }
  if (core->len >= ROVER_MAX_LINE) { core->overflow = 1; return 0; }
  core->buf[core->len++] = c;
  return 0;
}

// Periodic work: the failsafe timeout, the mode and outputs, and when due the telemetry lines T and R.
// out must hold ROVER_TICK_MAX bytes. Returns the length written to out (0: nothing due).
static inline size_t rover_tick(RoverCore* core, uint32_t now_ms, char* out) {
  out[0] = '\0';
  rover_update(core, now_ms);
  if ((uint32_t)(now_ms - core->last_telemetry_ms) < core->limits.telemetry_ms) return 0;
  core->last_telemetry_ms = now_ms;
  snprintf(out, ROVER_REPLY_MAX, "T,%lu,%u,%u,%u,%lu,%lu", (unsigned long)now_ms, (unsigned)core->steer_us,
           (unsigned)core->throttle_us, (unsigned)core->failsafe, (unsigned long)core->rx_ok,
           (unsigned long)core->rx_bad);
  size_t n = rover_frame(out);
  uint16_t rc[ROVER_RC_CHANNELS];
  for (uint8_t ch = 0; ch < ROVER_RC_CHANNELS; ch++) {
    rc[ch] = rover_rc_valid(core, ch, now_ms) ? core->rc_us[ch] : 0;
  }
  snprintf(out + n, ROVER_REPLY_MAX, "R,%u,%u,%u,%u,%u,%u", (unsigned)core->mode, (unsigned)rc[0],
           (unsigned)rc[1], (unsigned)rc[2], (unsigned)core->wheel_mmps, (unsigned)core->battery_mv);
  return n + rover_frame(out + n);
}

#endif  // ROVER_PROTOCOL_H
