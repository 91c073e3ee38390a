/* memvisor guest kernel: entry, exception stubs, the system call gate, the static IDT and the
 * embedded app image. Ring 0 runs through the host's instruction emulator here (about 1.3 us per
 * instruction), so every path is a handful of instructions. */
#include "../abi.h"

/* Exceptions that push an error code: 8, 10-14, 17, 21, 29, 30. */
#define ERRCODE_MASK 0x60227d00

/* The 32 exception stubs, 16 bytes apart, at exactly ABI_KERNEL_BASE (the linker script asserts
 * it), so the IDT below is static: stub i is at ABI_KERNEL_BASE + 16 * i. The stub for vector
 * SYSCALL_VECTOR is never used: that gate points at syscall_gate. */
        .section .text.isr, "ax"
        .globl isr_stubs, isr_stubs_end
isr_stubs:
        .set vec, 0
        .rept 32
        .balign 16
        .if (ERRCODE_MASK >> vec) & 1
        .else
        pushq $0
        .endif
        pushq $vec
        jmp isr_common
        .set vec, vec + 1
        .endr
        .balign 16
isr_stubs_end:

/* System calls: `int3` from ring 3 (gate SYSCALL_VECTOR, DPL 3), at ABI_KERNEL_BASE + 0x200.
 * rax = number, rdi, rsi = arguments, result in rax. The CPU switched to TSS.rsp0 and pushed SS,
 * RSP, RFLAGS, CS and the RIP after the int3 (40 bytes). */
        .globl syscall_gate
syscall_gate:
        subq $8, %rsp /* 16-byte alignment for the C call */
        movq %rax, %rdx
        call ksyscall
        addq $8, %rsp
        iretq

/* Stack: vector, error code, RIP, CS, RFLAGS, RSP, SS. */
isr_common:
        movq (%rsp), %rdi
        movq 8(%rsp), %rsi
        movq 16(%rsp), %rdx
        movq %cr2, %rcx
        movq 24(%rsp), %r8
        andq $-16, %rsp
        call kfault /* does not return */

        .section .text.entry, "ax"
        .globl _start
_start:
        movl $kstack_top, %esp
        call kmain /* does not return: ends in enter_user */
1:      hlt
        jmp 1b

/* enter_user(rdi = app rdi, rsi = app rsi, rdx = entry, rcx = user stack): IRETQ to ring 3 with
 * interrupts off (there is no interrupt controller). */
        .globl enter_user
enter_user:
        pushq $ABI_SEL_UDATA
        pushq %rcx
        pushq $2
        pushq $ABI_SEL_UCODE
        pushq %rdx
        iretq

        .section .data.idt, "aw"
        .balign 16
        .globl idt_desc
idt:
        .set vec, 0
        .rept 32
        .if vec == SYSCALL_VECTOR
        .word (ABI_KERNEL_BASE + 0x200) & 0xffff
        .word ABI_SEL_KCODE
        .byte 0, 0xee /* present, DPL 3, 64-bit interrupt gate */
        .word ((ABI_KERNEL_BASE + 0x200) >> 16) & 0xffff
        .else
        .word (ABI_KERNEL_BASE + 16 * vec) & 0xffff
        .word ABI_SEL_KCODE
        .byte 0, 0x8e /* present, DPL 0, 64-bit interrupt gate */
        .word ((ABI_KERNEL_BASE + 16 * vec) >> 16) & 0xffff
        .endif
        .long 0
        .long 0
        .set vec, vec + 1
        .endr
        .balign 8
        .word 0, 0, 0
idt_desc:
        .word 32 * 16 - 1
        .quad idt

/* The app image (objcopy -O binary of guest/app), page aligned at both ends so the kernel can
 * map it in place; the padding after it is zero. */
        .section .app, "aw"
        .balign 4096
        .globl app_blob, app_blob_end
app_blob:
        .incbin "app.bin"
        .balign 4096
app_blob_end:

        .section .bss
        .balign 4096
kstack:
        .skip 8192
        .globl kstack_top
kstack_top:

        .section .note.GNU-stack, "", @progbits
