// Runs the compiled sketch (rover_car.elf) on a simulated ATmega328P (simavr) and drives its UART.
// Build: gcc -O2 -I/usr/include/simavr -o simavr_run simavr_run.c -lsimavr -lelf   (apt: libsimavr-dev)
// Usage: simavr_run rover_car.elf, then one command per stdin line:
//   send <hex bytes>   queue bytes for the UART input (fed as the firmware's receive buffer frees up)
//   rc <steer_us> <throttle_us> <switch_us>   from now on, an RC receiver's 50 Hz pulses of these widths on
//                      pins 2, 3 and 4 (PD2-PD4), one after another in each 20 ms frame; 0 = no pulses
//   run <ms>           advance simulated time; prints every UART line the firmware wrote, then
//                      "pulses <steer_us> <throttle_us> <period_us>" measured from the edges of pins 9 (PB1)
//                      and 10 (PB2), "ocr_us <steer_us> <throttle_us>" from Timer1's compare registers, "."
// The edges check Timer1's configuration (period, pulse at boot). simavr 1.6 computes the pin's PWM edges
// when the timer is configured and does not follow later OCR1A/B writes, so the pulse width commanded after
// boot is read from the compare registers instead.
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "avr_ioport.h"
#include "avr_uart.h"
#include "sim_avr.h"
#include "sim_elf.h"

static avr_t* avr;
static char uart_line[256];
static size_t uart_len;
static uint8_t pending[4096];
static size_t pending_len, pending_pos;
static int uart_ready = 1;
static avr_cycle_count_t rise[2];
static long width_us[2];
static long period_us;
static long rc_width_us[3];
static int rc_level[3];
static avr_irq_t* rc_pin[3];

// Drives the receiver pins: channel k is high from k * 3000 + 500 us into each 20 ms frame, for its width.
static void drive_receiver(void) {
  long t_us = (long)((avr->cycle * 1000000ULL / avr->frequency) % 20000);
  for (int ch = 0; ch < 3; ch++) {
    long start = ch * 3000 + 500;
    int level = rc_width_us[ch] > 0 && t_us >= start && t_us < start + rc_width_us[ch];
    if (level != rc_level[ch]) {
      rc_level[ch] = level;
      avr_raise_irq(rc_pin[ch], level);
    }
  }
}

static void on_uart_out(struct avr_irq_t* irq, uint32_t value, void* param) {
  (void)irq;
  (void)param;
  if (value == '\n') {
    uart_line[uart_len] = 0;
    printf("uart %s\n", uart_line);
    uart_len = 0;
  } else if (uart_len < sizeof uart_line - 1) {
    uart_line[uart_len++] = (char)value;
  }
}

static void on_xon(struct avr_irq_t* irq, uint32_t value, void* param) {
  (void)irq;
  (void)value;
  (void)param;
  uart_ready = 1;
}

static void on_xoff(struct avr_irq_t* irq, uint32_t value, void* param) {
  (void)irq;
  (void)value;
  (void)param;
  uart_ready = 0;
}

static void on_pin(struct avr_irq_t* irq, uint32_t value, void* param) {
  (void)irq;
  int channel = (int)(intptr_t)param;
  if (value) {
    if (channel == 0 && rise[0]) period_us = (long)((avr->cycle - rise[0]) * 1000000ULL / avr->frequency);
    rise[channel] = avr->cycle;
  } else if (rise[channel]) {
    width_us[channel] = (long)((avr->cycle - rise[channel]) * 1000000ULL / avr->frequency);
  }
}

int main(int argc, char** argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: %s rover_car.elf\n", argv[0]);
    return 2;
  }
  elf_firmware_t firmware;
  memset(&firmware, 0, sizeof firmware);
  if (elf_read_firmware(argv[1], &firmware) != 0) {
    fprintf(stderr, "cannot read %s\n", argv[1]);
    return 1;
  }
  avr = avr_make_mcu_by_name("atmega328p");
  if (!avr) return 1;
  avr_init(avr);
  avr->frequency = 16000000;
  avr->log = 0;
  avr_load_firmware(avr, &firmware);
  avr->frequency = 16000000;

  uint32_t flags = 0;
  avr_ioctl(avr, AVR_IOCTL_UART_GET_FLAGS('0'), &flags);
  flags &= ~AVR_UART_FLAG_STDIO;
  avr_ioctl(avr, AVR_IOCTL_UART_SET_FLAGS('0'), &flags);
  avr_irq_register_notify(avr_io_getirq(avr, AVR_IOCTL_UART_GETIRQ('0'), UART_IRQ_OUTPUT), on_uart_out, NULL);
  avr_irq_register_notify(avr_io_getirq(avr, AVR_IOCTL_UART_GETIRQ('0'), UART_IRQ_OUT_XON), on_xon, NULL);
  avr_irq_register_notify(avr_io_getirq(avr, AVR_IOCTL_UART_GETIRQ('0'), UART_IRQ_OUT_XOFF), on_xoff, NULL);
  avr_irq_register_notify(avr_io_getirq(avr, AVR_IOCTL_IOPORT_GETIRQ('B'), 1), on_pin, (void*)0);
  avr_irq_register_notify(avr_io_getirq(avr, AVR_IOCTL_IOPORT_GETIRQ('B'), 2), on_pin, (void*)1);
  avr_irq_t* uart_in = avr_io_getirq(avr, AVR_IOCTL_UART_GETIRQ('0'), UART_IRQ_INPUT);
  for (int ch = 0; ch < 3; ch++) rc_pin[ch] = avr_io_getirq(avr, AVR_IOCTL_IOPORT_GETIRQ('D'), 2 + ch);

  char cmd[8192];
  while (fgets(cmd, sizeof cmd, stdin)) {
    char* word = strtok(cmd, " \n");
    if (!word) continue;
    if (strcmp(word, "send") == 0) {
      char* hex = strtok(NULL, " \n");
      for (size_t i = 0; hex && hex[i] && hex[i + 1] && pending_len < sizeof pending; i += 2) {
        char pair[3] = {hex[i], hex[i + 1], 0};
        pending[pending_len++] = (uint8_t)strtol(pair, NULL, 16);
      }
    } else if (strcmp(word, "rc") == 0) {
      for (int ch = 0; ch < 3; ch++) {
        char* value = strtok(NULL, " \n");
        rc_width_us[ch] = value ? strtol(value, NULL, 10) : 0;
      }
    } else if (strcmp(word, "run") == 0) {
      long ms = strtol(strtok(NULL, " \n"), NULL, 10);
      avr_cycle_count_t end = avr->cycle + (avr_cycle_count_t)ms * (avr->frequency / 1000);
      avr_cycle_count_t next_byte = avr->cycle;
      while (avr->cycle < end) {
        if (pending_pos < pending_len && uart_ready && avr->cycle >= next_byte) {
          avr_raise_irq(uart_in, pending[pending_pos++]);
          next_byte = avr->cycle + avr->frequency / 11520;  // one byte time at 115200 baud
        }
        drive_receiver();
        int state = avr_run(avr);
        if (state == cpu_Done || state == cpu_Crashed) {
          fprintf(stderr, "simulated CPU stopped (state %d)\n", state);
          return 1;
        }
      }
      if (pending_pos == pending_len) pending_pos = pending_len = 0;
      unsigned ocr1a = avr->data[0x88] | (avr->data[0x89] << 8);  // OCR1AL/H
      unsigned ocr1b = avr->data[0x8A] | (avr->data[0x8B] << 8);  // OCR1BL/H
      printf("pulses %ld %ld %ld\nocr_us %u %u\n.\n", width_us[0], width_us[1], period_us, ocr1a / 2, ocr1b / 2);
      fflush(stdout);
    } else {
      fprintf(stderr, "unknown command %s\n", word);
      return 2;
    }
  }
  return 0;
}
