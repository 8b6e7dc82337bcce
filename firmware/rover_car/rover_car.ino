// rover_car: the RC car's Arduino (Uno/Nano, ATmega328P). Drives the steering servo and the ESC from the
// runtime's serial commands (protocol: docs/serial-protocol.md, logic in rover_protocol.h), with the RC
// transmitter in charge: the receiver's mode switch selects manual (the driver's sticks pass straight
// through) or autopilot (the Pi's commands), and what happens when the Pi goes quiet (the driver's sticks, or
// neutral). Both outputs are neutral (1500 us) at boot, when a receiver channel loses its signal, and when the
// Pi's commands stop in autopilot with the neutral fallback (no valid command or heartbeat within
// FAILSAFE_TIMEOUT_MS).
//
// Receiver inputs: pins 2, 3 and 4 (steering, throttle, mode switch), measured with the pin-change
// interrupt of port D. Optional sensors: a wheel hall sensor on pin 5 (WHEEL_MM_PER_PULSE_X100 > 0) and the
// battery through a divider on A0 (BATTERY_MV_FULL_SCALE > 0); both are reported in the R telemetry line.
//
// Outputs: with the Arduino Servo library available (the Arduino IDE ships it) any pins work. Without it
// (Debian's arduino-core-avr has no Servo library) the sketch drives the pulses itself with Timer1's hardware
// PWM, which only exists on pins 9 (OC1A) and 10 (OC1B) of the ATmega328P; pulses are jitter-free at 0.5 us
// resolution, 50 Hz.

// ---- configuration ----
// Each setting can be given at build time instead (fleet_firmware build --define NAME=VALUE; the deploy's
// rover_firmware_defines), e.g. RC_RECEIVER=0 for a car without a receiver.
#ifndef STEERING_PIN
#define STEERING_PIN 9
#endif
#ifndef THROTTLE_PIN
#define THROTTLE_PIN 10
#endif
#ifndef SERIAL_BAUD
#define SERIAL_BAUD 115200
#endif
#ifndef FAILSAFE_TIMEOUT_MS
#define FAILSAFE_TIMEOUT_MS 250
#endif
#ifndef TELEMETRY_INTERVAL_MS
#define TELEMETRY_INTERVAL_MS 100
#endif
#ifndef HALF_RANGE_US
#define HALF_RANGE_US 500        // pulse offset for a full +-1000 command
#endif
#ifndef STEER_MIN_US
#define STEER_MIN_US 1000        // the firmware's own limits, applied after the runtime's clamping
#endif
#ifndef STEER_MAX_US
#define STEER_MAX_US 2000
#endif
#ifndef THROTTLE_MIN_US
#define THROTTLE_MIN_US 1000
#endif
#ifndef THROTTLE_MAX_US
#define THROTTLE_MAX_US 2000
#endif
#ifndef RC_RECEIVER
#define RC_RECEIVER 1            // 0: no receiver fitted, the Pi's commands drive (a bench setup)
#endif
#ifndef RC_TIMEOUT_MS
#define RC_TIMEOUT_MS 100        // a receiver channel without a valid pulse this long has lost its signal
#endif
#ifndef WHEEL_MM_PER_PULSE_X100
#define WHEEL_MM_PER_PULSE_X100 0  // wheel travel per hall pulse in 1/100 mm (0: no wheel sensor)
#endif
#ifndef WHEEL_WINDOW_MS
#define WHEEL_WINDOW_MS 100      // wheel speed is pulses counted over this window
#endif
#ifndef BATTERY_MV_FULL_SCALE
#define BATTERY_MV_FULL_SCALE 0  // battery millivolts at an ADC reading of 1023 (0: not measured)
#endif
// #define ROVER_USE_TIMER1      // force the built-in Timer1 driver even when <Servo.h> exists

#include "rover_protocol.h"

#if !defined(ROVER_USE_TIMER1) && defined(__has_include)
#if __has_include(<Servo.h>)
#define ROVER_USE_SERVO_LIBRARY
#endif
#endif

#ifdef ROVER_USE_SERVO_LIBRARY
#include <Servo.h>
static Servo steering_servo;
static Servo throttle_esc;

static void outputs_begin() {
  steering_servo.attach(STEERING_PIN);
  throttle_esc.attach(THROTTLE_PIN);
}

static void outputs_write(uint16_t steer_us, uint16_t throttle_us) {
  steering_servo.writeMicroseconds(steer_us);
  throttle_esc.writeMicroseconds(throttle_us);
}
#else
#if !defined(__AVR_ATmega328P__) || STEERING_PIN != 9 || THROTTLE_PIN != 10
#error "without the Servo library the outputs must be pins 9 and 10 of an ATmega328P (Timer1 OC1A/OC1B)"
#endif

static void outputs_write(uint16_t steer_us, uint16_t throttle_us) {
  // Timer1 runs at 2 MHz (16 MHz / 8): 2 ticks per microsecond. The compare registers are double-buffered
  // in fast PWM mode, so a new width takes effect at the start of the next 20 ms period.
  OCR1A = steer_us * 2;
  OCR1B = throttle_us * 2;
}

static void outputs_begin() {
  pinMode(STEERING_PIN, OUTPUT);
  pinMode(THROTTLE_PIN, OUTPUT);
  TCCR1A = 0;
  TCCR1B = 0;
  TCNT1 = 0;
  ICR1 = 40000;  // 20 ms period
  outputs_write(ROVER_NEUTRAL_US, ROVER_NEUTRAL_US);
  // Fast PWM, TOP = ICR1 (mode 14), non-inverting on OC1A and OC1B, prescaler 8.
  TCCR1A = _BV(COM1A1) | _BV(COM1B1) | _BV(WGM11);
  TCCR1B = _BV(WGM13) | _BV(WGM12) | _BV(CS11);
}
#endif

static const RoverLimits kLimits = {
    STEER_MIN_US,        STEER_MAX_US,          THROTTLE_MIN_US, THROTTLE_MAX_US, HALF_RANGE_US,
    FAILSAFE_TIMEOUT_MS, TELEMETRY_INTERVAL_MS, RC_RECEIVER,     RC_TIMEOUT_MS,
    (WHEEL_MM_PER_PULSE_X100 > 0 ? ROVER_FEATURE_WHEEL : 0) | (BATTERY_MV_FULL_SCALE > 0 ? ROVER_FEATURE_BATTERY : 0),
};
static RoverCore core;
static char reply[ROVER_TICK_MAX];

// ---- receiver and wheel inputs (port D pin-change interrupt) ----
#define RC_FIRST_PIN 2  // PD2, PD3, PD4: steering, throttle, mode switch
#define WHEEL_PIN 5     // PD5
static volatile uint8_t rc_last_pins;
static volatile uint32_t rc_rise_us[ROVER_RC_CHANNELS];
static volatile uint16_t rc_width_us[ROVER_RC_CHANNELS];
static volatile uint8_t rc_fresh;  // bit per channel: a new width was measured
static volatile uint16_t wheel_pulses;

ISR(PCINT2_vect) {
  uint8_t pins = PIND;
  uint8_t changed = pins ^ rc_last_pins;
  rc_last_pins = pins;
  uint32_t now = micros();
  for (uint8_t ch = 0; ch < ROVER_RC_CHANNELS; ch++) {
    uint8_t bit = _BV(RC_FIRST_PIN + ch);
    if (!(changed & bit)) continue;
    if (pins & bit) {
      rc_rise_us[ch] = now;
    } else {
      uint32_t width = now - rc_rise_us[ch];
      rc_width_us[ch] = width > 0xFFFF ? 0xFFFF : (uint16_t)width;
      rc_fresh |= (uint8_t)(1 << ch);
    }
  }
  if (changed & pins & _BV(WHEEL_PIN)) wheel_pulses++;
}

static void inputs_begin() {
  for (uint8_t pin = RC_FIRST_PIN; pin <= WHEEL_PIN; pin++) pinMode(pin, INPUT);
  rc_last_pins = PIND;
  PCMSK2 = _BV(PCINT18) | _BV(PCINT19) | _BV(PCINT20) | (WHEEL_MM_PER_PULSE_X100 > 0 ? _BV(PCINT21) : 0);
  PCICR |= _BV(PCIE2);
}

static void inputs_poll(uint32_t now_ms) {
  uint16_t widths[ROVER_RC_CHANNELS];
  uint8_t fresh;
  noInterrupts();
  fresh = rc_fresh;
  rc_fresh = 0;
  for (uint8_t ch = 0; ch < ROVER_RC_CHANNELS; ch++) widths[ch] = rc_width_us[ch];
  interrupts();
  for (uint8_t ch = 0; ch < ROVER_RC_CHANNELS; ch++) {
    if (fresh & (1 << ch)) rover_rc_pulse(&core, ch, widths[ch], now_ms);
  }
}

static uint32_t sensors_ms;

static void sensors_poll(uint32_t now_ms) {
  uint32_t elapsed = now_ms - sensors_ms;
  if (elapsed < WHEEL_WINDOW_MS) return;
  sensors_ms = now_ms;
#if WHEEL_MM_PER_PULSE_X100 > 0
  noInterrupts();
  uint16_t pulses = wheel_pulses;
  wheel_pulses = 0;
  interrupts();
  uint32_t mmps = (uint32_t)pulses * WHEEL_MM_PER_PULSE_X100 * 10 / elapsed;  // 1/100 mm per ms -> mm/s
  core.wheel_mmps = mmps > 0xFFFF ? 0xFFFF : (uint16_t)mmps;
#endif
#if BATTERY_MV_FULL_SCALE > 0
  core.battery_mv = (uint16_t)((uint32_t)analogRead(A0) * BATTERY_MV_FULL_SCALE / 1023);
#endif
}
static uint16_t written_steer_us = 0, written_throttle_us = 0;

static void apply_outputs() {
  if (core.steer_us != written_steer_us || core.throttle_us != written_throttle_us) {
    outputs_write(core.steer_us, core.throttle_us);
    written_steer_us = core.steer_us;
    written_throttle_us = core.throttle_us;
  }
}

void setup() {
  rover_init(&core, &kLimits, millis());
  outputs_begin();  // neutral from the first pulse: ESCs arm on a steady neutral
  apply_outputs();
  inputs_begin();
  Serial.begin(SERIAL_BAUD);
}

void loop() {
  inputs_poll(millis());
  while (Serial.available() > 0) {
    char c = (char)Serial.read();
    size_t n = rover_feed(&core, c, millis(), reply);
    apply_outputs();  // a command takes effect before its acknowledgement is sent
    if (n > 0) Serial.write(reply, n);
  }
  sensors_poll(millis());
  size_t n = rover_tick(&core, millis(), reply);
  apply_outputs();
  if (n > 0) Serial.write(reply, n);
}
