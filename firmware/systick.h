/* systick.h: instruction counting with SysTick for the firmware programs (harness.c, learn_harness.c).
 *
 * SysTick (ARMv7-M ARM, B3.3) is a 24-bit down-counter on the core clock, present on every
 * Cortex-M; its interrupt counts the wraps, so a measured call may take any number of ticks.  Under
 * QEMU -icount shift=0 the virtual clock advances 1 ns per instruction, so on mps2-an386 (25 MHz)
 * one tick is 40 instructions (exporters/firmware.py, INSNS_PER_TICK): the ticks count
 * instructions, not a real chip's cycles.  Used by harness.c and learn_harness.c.
 */
#ifndef BLL_SYSTICK_H
#define BLL_SYSTICK_H
#include <stdint.h>

#define SYST_CSR (*(volatile uint32_t *)0xE000E010u)
#define SYST_RVR (*(volatile uint32_t *)0xE000E014u)
#define SYST_CVR (*(volatile uint32_t *)0xE000E018u)
#define SCB_ICSR (*(volatile uint32_t *)0xE000ED04u)
#define ICSR_PENDSTSET (1u << 26)          /* SysTick exception pending */
#ifndef SYST_PERIOD
#define SYST_PERIOD 0x1000000u             /* 2**24 ticks between wraps (the tests try shorter) */
#endif

static volatile uint32_t systick_wraps;

void SysTick_Handler(void)
{
    ++systick_wraps;
}

static void ticks_start(void)
{
    SYST_RVR = SYST_PERIOD - 1u;
    SYST_CVR = 0;                          /* any write clears the count: reload on the next tick */
    SYST_CSR = 7u;                         /* enable, interrupt on wrap, core clock */
}

/* Ticks since ticks_start: wraps * SYST_PERIOD + the elapsed part of this period. */
static uint64_t ticks_now(void)
{
    uint32_t w, v;
    __asm__ volatile("cpsid i" ::: "memory");       /* the wrap handler cannot run while we read */
    w = systick_wraps;
    v = SYST_CVR;
    /* A wrap whose handler has not run yet: the counter was already reloaded (v near the top). */
    if ((SCB_ICSR & ICSR_PENDSTSET) && v > SYST_PERIOD / 2)
        ++w;
    __asm__ volatile("cpsie i" ::: "memory");
    return (uint64_t)w * SYST_PERIOD + (SYST_PERIOD - 1u - v);
}
#endif
